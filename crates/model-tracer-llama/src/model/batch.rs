//! Many sequences in one forward (continuous batching): each sequence has
//! its own KV cache and logits ([`Sequence`]); one forward runs the rows
//! of several (a prefill chunk of one beside the decode steps of others)
//! through the multi-row products together, each row attending its own
//! sequence's cache.
//!
//! Every row goes through the f32 operations its sequence's forward of
//! the one-sequence API would run, in the same order: the products of the
//! rows are `QMatrix::matmul`, bit for bit `matvec` of each row, the
//! attention of a sequence's rows is that of a chunk of its own, and the
//! LM head of the rows that need logits is one product too. So a
//! sequence's logits, cache and greedy tokens are those of running it
//! alone, whoever shares its forwards and however its prompt is chunked.

use model_tracer::config::TraceConfig;
use model_tracer::quant::BrickId;
use model_tracer::sequence::{BatchRow, SequenceId};
use model_tracer::tracer::{ModelTracer, SequenceTrace};
use model_tracer::{traced, Stage};

use super::{
    attention_block_rows, attention_heads_rows, ffn_block_rows, logit_lens, rmsnorm_rows,
    trace_what_if, ChunkState, KvCache, KvCacheOptions, Llama, Products, RowsInput,
};

/// One sequence of a model's forwards over several sequences
/// ([`Llama::forward_batch`]): its KV cache (own capacity and
/// StreamingLLM eviction), the logits after its last token, and its step
/// count for the KV trace. Made by [`Llama::new_sequence`]; its keys and
/// values belong to the weights of the model that made it (or of any model
/// over the same weights and path, see [`Llama::from_shared`]).
#[derive(Debug, Clone)]
pub struct Sequence {
    id: SequenceId,
    cache: KvCache,
    logits: Vec<f32>,
    steps: usize,
}

impl Sequence {
    /// The sequence's id: its records in the tracer carry it
    /// ([`model_tracer::ForwardTrace::sequence`]).
    pub fn id(&self) -> SequenceId {
        self.id
    }

    /// Its KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The logits of the next token after the last one it ran (`vocab`
    /// values); empty before its first forward.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// The position its next token takes.
    pub fn next_position(&self) -> usize {
        self.cache.next_position()
    }

    /// Forgets its conversation (cache and logits); the id and the step
    /// count stay.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.logits.clear();
    }
}

/// One sequence's part of a forward over several sequences: `tokens` run
/// at its next positions, several for a prefill chunk, one for a decode
/// step, none to sit the forward out.
#[derive(Debug)]
pub struct SequenceStep<'a> {
    /// The sequence.
    pub sequence: &'a mut Sequence,
    /// Its tokens (an id outside the vocabulary is read as token 0).
    pub tokens: &'a [u32],
}

impl<'a> SequenceStep<'a> {
    /// `tokens` of `sequence`.
    pub fn new(sequence: &'a mut Sequence, tokens: &'a [u32]) -> Self {
        Self { sequence, tokens }
    }
}

/// Where one sequence's rows sit in a forward over several: rows
/// `first..first + rows`, of step `entry`; it attends the positions its
/// cache held before the forward, `old_slots[old..old + old_len]`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    entry: usize,
    first: usize,
    rows: usize,
    old: usize,
    old_len: usize,
    // Index of its last row's logits in `BatchRows::head_out`.
    head: usize,
}

/// The rows of a forward over several sequences, and the buffers of its
/// LM head, grown to the largest forward and then reused.
#[derive(Debug, Clone, Default)]
pub(super) struct BatchRows {
    tokens: Vec<u32>,      // (T) tokens, out-of-vocabulary ids read as 0
    positions: Vec<usize>, // (T) position of each row in its sequence
    slots: Vec<usize>,     // (T) cache slot of each row in its sequence's cache
    trace: Vec<BatchRow>,  // (T) the rows as the tracer names them
    segments: Vec<Segment>,
    old_slots: Vec<usize>, // each segment's cache slots before the forward
    taken: Vec<usize>,     // tokens of each step run so far
    head_rows: Vec<usize>, // rows whose logits are computed
    head_in: Vec<f32>,     // (head_rows, dim) their final-normed states
    head_out: Vec<f32>,    // (head_rows, vocab) their logits
}

impl<C: TraceConfig> Llama<C> {
    /// A new sequence with its own KV cache of `cache` (capacity clamped
    /// to `2..=context_len`), and the next id of this model (0, 1, 2, ...).
    pub fn new_sequence(&mut self, cache: KvCacheOptions) -> Sequence {
        let id = SequenceId(self.next_sequence);
        self.next_sequence += 1;
        self.new_sequence_with_id(id, cache)
    }

    /// A new sequence named `id` with its own KV cache of `cache`. Two
    /// live sequences of one forward should not share an id: the tracer
    /// records only the first segment of an id in a forward.
    pub fn new_sequence_with_id(&self, id: SequenceId, cache: KvCacheOptions) -> Sequence {
        let capacity = cache.capacity.clamp(2, self.config.context_len);
        Sequence {
            id,
            cache: KvCache::new(
                self.config.n_layers,
                self.config.n_kv_heads,
                self.config.head_dim,
                KvCacheOptions { capacity, ..cache },
            ),
            logits: Vec::new(),
            steps: 0,
        }
    }

    /// Drops `sequence` and releases its lane in the tracer, returning what
    /// the tracer recorded of it (`None` with a tracer that does not record
    /// or a sequence it never saw): see
    /// [`ModelTracer::end_sequence`](model_tracer::ModelTracer::end_sequence).
    pub fn end_sequence(&mut self, sequence: Sequence) -> Option<SequenceTrace> {
        self.tracer.end_sequence(sequence.id)
    }

    /// Runs every step's tokens at its sequence's next positions, the rows
    /// of all the steps in the same forwards, and leaves in each sequence
    /// that ran a token the logits after its last one
    /// ([`Sequence::logits`]).
    ///
    /// A forward takes up to [`prefill_chunk`](Self::prefill_chunk)
    /// tokens of each step (and no more than its cache's capacity minus
    /// its sinks, so that no row evicts a key a row before it reads);
    /// longer steps run over several forwards, the others sitting out once
    /// done. Each weight matrix is read once per forward for all the rows;
    /// the LM head runs on the last row of each sequence and on the rows
    /// the tracer asks logits for. The tracer sees one forward over several
    /// sequences ([`ModelTracer::begin_forward_batch`]), each row named
    /// by its sequence and position. The results of each sequence are, to
    /// the bit, those of running its tokens alone through
    /// [`forward`](Self::forward) and [`forward_chunks`](Self::forward_chunks).
    pub fn forward_batch(&mut self, batch: &mut [SequenceStep<'_>]) {
        self.batch.taken.clear();
        self.batch.taken.resize(batch.len(), 0);
        while self.place_batch(batch) {
            self.run_batch(batch);
        }
    }

    /// Places the next tokens of each step: pushes them into their
    /// sequences' caches and notes their rows; false when none is left.
    fn place_batch(&mut self, batch: &mut [SequenceStep<'_>]) -> bool {
        let vocab = self.config.vocab_size;
        let chunk = self.prefill_chunk.max(1);
        let r = &mut self.batch;
        r.tokens.clear();
        r.positions.clear();
        r.slots.clear();
        r.trace.clear();
        r.segments.clear();
        r.old_slots.clear();
        for (entry, step) in batch.iter_mut().enumerate() {
            let taken = r.taken[entry];
            let cache = &mut step.sequence.cache;
            let n = (step.tokens.len() - taken).min(chunk.min(cache.chunk_room()).max(1));
            if n == 0 {
                continue;
            }
            let old = r.old_slots.len();
            r.old_slots.extend((0..cache.len).map(|t| cache.slot(t)));
            let first = r.tokens.len();
            let start = cache.next_position();
            cache.step_evictions = 0;
            for (i, &t) in step.tokens[taken..taken + n].iter().enumerate() {
                let t = if (t as usize) < vocab { t } else { 0 };
                let position = start + i;
                r.tokens.push(t);
                r.positions.push(position);
                r.slots.push(cache.push(t, position));
                r.trace.push(BatchRow::new(step.sequence.id, position));
            }
            r.segments.push(Segment {
                entry,
                first,
                rows: n,
                old,
                old_len: r.old_slots.len() - old,
                head: 0,
            });
            r.taken[entry] = taken + n;
        }
        !r.tokens.is_empty()
    }

    /// One forward over the rows [`place_batch`](Self::place_batch) placed.
    fn run_batch(&mut self, batch: &mut [SequenceStep<'_>]) {
        let Llama {
            config: c,
            weights,
            state: s,
            chunk: b,
            batch: r,
            tracer,
            fault,
            exact,
            pool,
            ..
        } = self;
        let w = &**weights;
        let (products, fault) = (
            Products {
                exact: *exact,
                pool,
            },
            *fault,
        );
        let (dim, kv_dim, n_layers, vocab) = (c.dim, c.kv_dim(), c.n_layers, c.vocab_size);
        let rows = r.tokens.len();
        b.resize(c, rows, 0);
        // a segment's attention row i of a head spans min(old_len + i + 1, cap) positions
        let att = r
            .segments
            .iter()
            .map(|g| c.n_heads * g.rows * batch[g.entry].sequence.cache.len)
            .max()
            .unwrap_or(0);
        b.att.resize(att, 0.0);
        traced!(C, tracer.begin_forward_batch(&r.trace));
        traced!(C, tracer.input_tokens(&r.tokens));
        // rows whose hidden states go through the logit lens
        let mut lens = false;
        traced!(C, lens = tracer.wants_logit_lens());
        if lens {
            b.lens_hidden.resize(rows * n_layers * dim, 0.0);
        }

        // token embeddings
        for (x, &t) in b.x.chunks_exact_mut(dim).zip(&r.tokens) {
            w.token_embd.dequantize_row(t as usize, x);
        }
        traced!(C, tracer.activation(0, Stage::Embedding, &b.x));

        for (l, lw) in w.layers.iter().enumerate() {
            traced!(C, tracer.activation(l, Stage::Input, &b.x));
            // x[i] += attention(norm(x[i])), each sequence's rows against
            // its own cache, their keys and values cached
            let attend = |t: &mut ModelTracer<C>, b: &mut ChunkState| {
                for g in &r.segments {
                    let cache = &mut batch[g.entry].sequence.cache;
                    let old = &r.old_slots[g.old..g.old + g.old_len];
                    attention_heads_rows(t, c, l, b, cache, g.first, g.rows, old, true, pool);
                    for i in g.first..g.first + g.rows {
                        let (k, v) = (&b.k[i * kv_dim..][..kv_dim], &b.v[i * kv_dim..][..kv_dim]);
                        cache.store(l, r.slots[i], k, v);
                    }
                }
            };
            attention_block_rows(
                tracer,
                c,
                lw,
                l,
                b,
                s,
                &r.positions,
                fault,
                products,
                attend,
            );
            // x[i] += ffn(norm(x[i]))
            ffn_block_rows(tracer, c, lw, l, b, s, &r.positions, fault, products);
            // The layer's residual ratio from the norms of its input and of
            // both updates, already summarised by the activation hooks.
            traced!(C, tracer.residual_from_stages(l));
            traced!(C, tracer.activation(l, Stage::Output, &b.x));
            // hidden states for the logit lens, (row, layer, dim)
            if lens {
                for (i, x) in b.x.chunks_exact(dim).enumerate() {
                    let at = (i * n_layers + l) * dim;
                    b.lens_hidden[at..at + dim].copy_from_slice(x);
                }
            }
        }

        // final rmsnorm
        rmsnorm_rows(&mut b.xb, &b.x, &w.output_norm, dim, c.rms_eps);
        traced!(C, tracer.activation(0, Stage::FinalNorm, &b.xb));

        // classifier into logits, as one product: the last row of each
        // sequence, and the rows the tracer asks for
        r.head_rows.clear();
        r.head_in.clear();
        for g in &mut r.segments {
            for i in g.first..g.first + g.rows {
                let last = i + 1 == g.first + g.rows;
                let mut traced_logits = false;
                traced!(C, traced_logits = tracer.wants_logits(i));
                if last || traced_logits {
                    if last {
                        g.head = r.head_rows.len();
                    }
                    r.head_rows.push(i);
                    r.head_in.extend_from_slice(&b.xb[i * dim..(i + 1) * dim]);
                }
            }
        }
        r.head_out.resize(r.head_rows.len() * vocab, 0.0);
        RowsInput::new(&r.head_in, dim, &mut b.xq, products).multiply(&w.output, &mut r.head_out);
        traced!(C, {
            for (j, &i) in r.head_rows.iter().enumerate() {
                let out = &r.head_out[j * vocab..(j + 1) * vocab];
                let x = &r.head_in[j * dim..(j + 1) * dim];
                tracer.focus_row(i);
                let ty = w.output.quant_type();
                tracer.quant_error(BrickId::LmHead, 0, ty, out, |refr| {
                    w.output.reference(x, refr);
                });
                trace_what_if(tracer, BrickId::LmHead, 0, &[&w.output], x);
                if lens {
                    let hidden = &b.lens_hidden[i * n_layers * dim..(i + 1) * n_layers * dim];
                    logit_lens(
                        tracer,
                        c,
                        w,
                        hidden,
                        &mut s.lens_x,
                        &mut s.lens_scratch,
                        &s.lens_layers,
                        out,
                        products.exact,
                    );
                }
                tracer.final_logits(out);
            }
        });

        // each sequence's logits, and the KV cache state of each row as
        // its sequence's one-position forward records it
        for g in &r.segments {
            let seq = &mut *batch[g.entry].sequence;
            seq.logits.clear();
            seq.logits
                .extend_from_slice(&r.head_out[g.head * vocab..(g.head + 1) * vocab]);
            for k in 0..g.rows {
                let i = g.first + k;
                traced!(C, {
                    tracer.focus_row(i);
                    let (cache, step, pos) = (&seq.cache, seq.steps + k, r.positions[i]);
                    tracer.kv_state(|| cache.row_state(step, n_layers, g.old_len, k, pos));
                });
            }
            seq.steps += g.rows;
        }
        traced!(C, tracer.end_forward());
    }
}
