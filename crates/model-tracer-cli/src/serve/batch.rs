//! The [`Engine`] of the server: the reference decoder's forwards over
//! several sequences ([`Llama::forward_batch`]), on three models over one
//! copy of the weights, `Llama<Disabled>`, `Llama<Lightweight>` and
//! `Llama<Full>`. A sequence runs on the model of its trace level, with a
//! KV cache of its own sized to its prompt and `max_tokens`; a step is one
//! batch forward per level that has work in it, each weight block read
//! once for all the rows of that level.

use model_tracer::sink::BackgroundFlush;
use model_tracer::tracer::MAX_SEQUENCES;
use model_tracer::{Disabled, Full, Lightweight, TraceConfig};
use model_tracer_llama::model::{KvCacheOptions, Llama, Sequence, SequenceStep};

use super::engine::{
    lock_rows, outcome_of, Engine, Level, SeqId, StepWork, TraceContext, TraceOutcome,
};

/// Positions at the start of a sequence's cache that are never evicted.
/// A sequence's cache holds its whole request, so nothing is evicted
/// anyway; the sinks only matter to the cache's layout.
pub const SINKS: usize = 4;

/// A running sequence.
struct Entry {
    level: Level,
    sequence: Sequence,
}

/// Many sequences, batched per trace level.
pub struct BatchEngine {
    off: Llama<Disabled>,
    light: Llama<Lightweight>,
    full: Llama<Full>,
    context: TraceContext,
    /// Waits for the row writers of the Lightweight and Full models.
    flush: [Option<BackgroundFlush>; 2],
    running: Vec<Entry>,
    next: u64,
}

impl BatchEngine {
    /// An engine over three models sharing their weights; their tracers
    /// are made anew to route each sequence's rows to its own trace.
    pub fn new(
        mut off: Llama<Disabled>,
        mut light: Llama<Lightweight>,
        mut full: Llama<Full>,
        context: TraceContext,
    ) -> Self {
        context.install(off.tracer_mut());
        let flush = [
            context.install(light.tracer_mut()),
            context.install(full.tracer_mut()),
        ];
        Self {
            off,
            light,
            full,
            context,
            flush,
            running: Vec::new(),
            next: 0,
        }
    }
}

fn run<C: TraceConfig>(
    model: &mut Llama<C>,
    level: Level,
    running: &mut [Entry],
    work: &[StepWork],
) {
    let mut steps: Vec<SequenceStep<'_>> = running
        .iter_mut()
        .filter(|e| e.level == level)
        .filter_map(|e| {
            let id = e.sequence.id();
            work.iter()
                .find(|w| w.seq == id)
                .map(|w| SequenceStep::new(&mut e.sequence, &w.tokens))
        })
        .collect();
    if !steps.is_empty() {
        model.forward_batch(&mut steps);
    }
}

impl Engine for BatchEngine {
    fn capacity(&self) -> usize {
        MAX_SEQUENCES
    }

    fn has_level(&self, _level: Level) -> bool {
        true
    }

    fn start(&mut self, level: Level, positions: usize) -> Result<SeqId, String> {
        if self.running.len() >= MAX_SEQUENCES {
            return Err(format!("the engine runs {MAX_SEQUENCES} sequences at most"));
        }
        let id = model_tracer::SequenceId(self.next);
        self.next += 1;
        let cache = KvCacheOptions {
            capacity: positions.max(2),
            sinks: SINKS,
            // the cache type --kv-type gave the models
            kv_type: self.light.cache().kv_type(),
        };
        let sequence = match level {
            Level::Off => self.off.new_sequence_with_id(id, cache),
            Level::Lightweight => self.light.new_sequence_with_id(id, cache),
            Level::Full => self.full.new_sequence_with_id(id, cache),
        };
        if level != Level::Off {
            lock_rows(&self.context.rows).insert(id, Vec::new());
        }
        self.running.push(Entry { level, sequence });
        Ok(id)
    }

    fn step(&mut self, work: &[StepWork]) -> Result<(), String> {
        if let Some(w) = work
            .iter()
            .find(|w| !self.running.iter().any(|e| e.sequence.id() == w.seq))
        {
            return Err(format!("no sequence {}", w.seq.0));
        }
        let BatchEngine {
            off,
            light,
            full,
            running,
            ..
        } = self;
        run(off, Level::Off, running, work);
        run(light, Level::Lightweight, running, work);
        run(full, Level::Full, running, work);
        Ok(())
    }

    fn logits(&self, seq: SeqId) -> Option<&[f32]> {
        self.running
            .iter()
            .find(|e| e.sequence.id() == seq)
            .map(|e| e.sequence.logits())
    }

    fn finish(&mut self, seq: SeqId) -> TraceOutcome {
        let Some(at) = self.running.iter().position(|e| e.sequence.id() == seq) else {
            lock_rows(&self.context.rows).remove(&seq);
            return TraceOutcome::default();
        };
        let writer = match self.running[at].level {
            Level::Off => None,
            Level::Lightweight => self.flush[0].as_ref(),
            Level::Full => self.flush[1].as_ref(),
        };
        if let Some(writer) = writer {
            // Its last rows may still be queued; the router never fails,
            // and a writer that stopped has written all it will.
            let _ = writer.flush();
        }
        let rows = lock_rows(&self.context.rows).remove(&seq);
        let Entry { level, sequence } = self.running.swap_remove(at);
        let trace = match level {
            Level::Off => self.off.end_sequence(sequence),
            Level::Lightweight => self.light.end_sequence(sequence),
            Level::Full => self.full.end_sequence(sequence),
        };
        if level != Level::Off {
            // Its request counts in the health families, corrupted at the
            // origin its forwards produced, if any.
            self.context.metrics.finish_sequence(seq);
        }
        match trace {
            Some(t) => outcome_of(&t.summary, rows.unwrap_or_default()),
            None => TraceOutcome::default(),
        }
    }
}
