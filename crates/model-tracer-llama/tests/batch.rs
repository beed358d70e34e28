//! Many sequences in one forward: each sequence's logits, KV cache, greedy
//! tokens and trace records are, to the bit, those of running it alone
//! through the one-sequence API, whoever shares its forwards.

mod common;

use std::sync::Arc;

use model_tracer::{
    AnomalyKind, Disabled, ForwardTrace, Full, Lightweight, ModelTracer, Stage, TraceConfig,
    TraceOptions, TraceSummary,
};
use model_tracer_llama::dtype::GgmlType;
use model_tracer_llama::model::{
    synthetic_weights, Config, Fault, FaultKind, KvCache, KvCacheOptions, KvType, Llama, Sequence,
    SequenceStep, Weights,
};
use model_tracer_llama::tokenizer::Tokenizer;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn argmax(v: &[f32]) -> u32 {
    model_tracer::stats::argmax(v).unwrap_or(0) as u32
}

/// One sequence of a run: its prompt, the step it joins at, the chunks its
/// prompt runs in, the greedy tokens it generates, its cache's capacity.
#[derive(Debug, Clone)]
struct Plan {
    prompt: Vec<u32>,
    join: usize,
    chunk: usize,
    decode: usize,
    capacity: usize,
}

/// A cache, every bit of it that a forward reads.
#[derive(Debug, PartialEq)]
struct CacheImage {
    tokens: Vec<u32>,
    positions: Vec<usize>,
    evictions: usize,
    next_position: usize,
    keys: Vec<u32>,
    values: Vec<u32>,
}

fn image(cache: &KvCache, layers: usize) -> CacheImage {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for l in 0..layers {
        for t in 0..cache.len() {
            keys.extend(bits(&cache.key(l, t).unwrap_or_default()));
            values.extend(bits(&cache.value(l, t).unwrap_or_default()));
        }
    }
    CacheImage {
        tokens: cache.tokens().collect(),
        positions: cache.positions().collect(),
        evictions: cache.total_evictions(),
        next_position: cache.next_position(),
        keys,
        values,
    }
}

/// What a sequence gave: its logits after each step, its greedy tokens,
/// its cache at the end, its trace records and summary.
#[derive(Debug)]
struct Outcome {
    logits: Vec<Vec<u32>>,
    tokens: Vec<u32>,
    cache: CacheImage,
    forwards: Vec<ForwardTrace>,
    summary: Option<TraceSummary>,
}

fn options() -> TraceOptions {
    TraceOptions {
        max_forwards: 4096,
        ..TraceOptions::default()
    }
}

fn cache_of(p: &Plan) -> KvCacheOptions {
    KvCacheOptions {
        capacity: p.capacity,
        sinks: 4,
        kv_type: KvType::F32,
    }
}

/// Runs every plan alone, on a model of its own over `weights`.
fn run_alone<C: TraceConfig>(
    weights: &Arc<Weights>,
    config: &Config,
    trace: C,
    fault: Option<Fault>,
    p: &Plan,
) -> Outcome {
    let mut m = match Llama::from_shared(
        Arc::clone(weights),
        config.clone(),
        None,
        cache_of(p),
        trace.clone(),
    ) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    *m.tracer_mut() = ModelTracer::with_options(trace, options());
    m.set_fault(fault);
    m.set_prefill_chunk(p.chunk);
    let mut logits = Vec::new();
    for part in p.prompt.chunks(p.chunk) {
        logits.push(bits(m.forward_chunks(part)));
    }
    let mut tokens = vec![argmax(m.logits())];
    while tokens.len() < p.decode {
        let next = argmax(m.forward(tokens[tokens.len() - 1]));
        logits.push(bits(m.logits()));
        tokens.push(next);
    }
    Outcome {
        logits,
        tokens,
        cache: image(m.cache(), config.n_layers),
        forwards: m.tracer().forwards().cloned().collect(),
        summary: C::ANY.then(|| m.tracer().summary()),
    }
}

/// Runs the plans together, a server's way: at each step every sequence
/// that has joined and not finished runs its next prompt chunk or its last
/// greedy token, all in one `forward_batch`; a sequence leaves when done.
fn run_batch<C: TraceConfig>(m: &mut Llama<C>, plans: &[Plan]) -> Vec<Outcome> {
    let n = plans.len();
    let mut live: Vec<Option<Sequence>> = (0..n).map(|_| None).collect();
    let mut fed = vec![0usize; n];
    let mut logits: Vec<Vec<Vec<u32>>> = vec![Vec::new(); n];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut out: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    for step in 0.. {
        if out.iter().all(Option::is_some) {
            break;
        }
        assert!(step < 10_000, "the run does not end");
        for (i, p) in plans.iter().enumerate() {
            if p.join == step {
                live[i] = Some(m.new_sequence(cache_of(p)));
            }
        }
        let inputs: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                let p = &plans[i];
                match &live[i] {
                    Some(_) if fed[i] < p.prompt.len() => {
                        let end = (fed[i] + p.chunk).min(p.prompt.len());
                        p.prompt[fed[i]..end].to_vec()
                    }
                    Some(_) => vec![tokens[i][tokens[i].len() - 1]],
                    None => Vec::new(),
                }
            })
            .collect();
        let mut steps: Vec<SequenceStep<'_>> = live
            .iter_mut()
            .zip(&inputs)
            .filter_map(|(s, t)| Some(SequenceStep::new(s.as_mut()?, t)))
            .collect();
        m.forward_batch(&mut steps);
        drop(steps);
        for i in 0..n {
            let Some(seq) = &live[i] else { continue };
            let p = &plans[i];
            let prefill = fed[i] < p.prompt.len();
            if prefill {
                fed[i] += inputs[i].len();
            }
            logits[i].push(bits(seq.logits()));
            if fed[i] < p.prompt.len() {
                continue;
            }
            tokens[i].push(argmax(seq.logits()));
            if tokens[i].len() == p.decode {
                let cache = image(seq.cache(), m.config.n_layers);
                let id = seq.id();
                let forwards: Vec<ForwardTrace> = m
                    .tracer()
                    .sequence_forwards(id)
                    .cloned()
                    .map(|mut f| {
                        assert_eq!(f.sequence, Some(id));
                        f.sequence = None;
                        f
                    })
                    .collect();
                let summary = m.tracer().sequence_summary(id);
                let seq = live[i].take().unwrap_or_else(|| unreachable!());
                let ended = m.end_sequence(seq);
                assert_eq!(
                    format!("{:?}", ended.as_ref().map(|e| &e.summary)),
                    format!("{:?}", summary.as_ref()),
                    "the summary end_sequence returns is the live one"
                );
                assert_eq!(m.tracer().sequence_summary(id), None, "released");
                out[i] = Some(Outcome {
                    logits: std::mem::take(&mut logits[i]),
                    tokens: std::mem::take(&mut tokens[i]),
                    cache,
                    forwards,
                    summary,
                });
            }
        }
    }
    out.into_iter().flatten().collect()
}

/// Compares a batched outcome with the alone one: logits, tokens, cache,
/// and the trace records (Debug text: NaN included) and summary.
fn assert_same(what: &str, batch: &Outcome, alone: &Outcome) {
    assert_eq!(batch.logits.len(), alone.logits.len(), "{what}: steps");
    for (i, (a, b)) in batch.logits.iter().zip(&alone.logits).enumerate() {
        assert!(a == b, "{what}: logits of step {i} differ");
    }
    assert_eq!(batch.tokens, alone.tokens, "{what}: greedy tokens");
    assert!(batch.cache == alone.cache, "{what}: KV cache differs");
    assert_eq!(
        batch.forwards.len(),
        alone.forwards.len(),
        "{what}: forwards"
    );
    for (a, b) in batch.forwards.iter().zip(&alone.forwards) {
        assert_eq!(
            format!("{a:?}"),
            format!("{b:?}"),
            "{what}: the records of position {}",
            b.position
        );
    }
    assert_eq!(
        format!("{:?}", batch.summary),
        format!("{:?}", alone.summary),
        "{what}: summary"
    );
}

/// Prompts of the tiny vocabulary, one with an out-of-vocabulary id.
fn tiny_prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| {
            if seed == 2 && i == 3 {
                9999
            } else {
                (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 977)) % 512
            }
        })
        .collect()
}

/// Six sequences joining at different steps, prefilled in chunks of 1 to
/// 16 beside the others' decode steps, one in a 16-position cache that
/// evicts during its prefill and its decode.
fn tiny_plans() -> Vec<Plan> {
    let plan = |seed, n, join, chunk, decode, capacity| Plan {
        prompt: tiny_prompt(seed, n),
        join,
        chunk,
        decode,
        capacity,
    };
    vec![
        plan(0, 23, 0, 8, 6, 256),
        plan(1, 5, 0, 1, 9, 256),
        plan(2, 30, 2, 16, 4, 256),
        plan(3, 28, 3, 5, 12, 16),
        plan(4, 1, 4, 4, 3, 64),
        plan(5, 11, 7, 11, 5, 256),
    ]
}

fn tiny_weights() -> (Config, Arc<Weights>) {
    let c = Config::tiny();
    match synthetic_weights(&c, GgmlType::Q4_1, 9) {
        Ok(w) => (c, Arc::new(w)),
        Err(e) => panic!("{e}"),
    }
}

fn batch_model<C: TraceConfig>(
    w: &Arc<Weights>,
    c: &Config,
    tokenizer: Option<Arc<Tokenizer>>,
    trace: C,
) -> Llama<C> {
    let cache = KvCacheOptions {
        capacity: 8,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let mut m = match Llama::from_shared(Arc::clone(w), c.clone(), tokenizer, cache, trace.clone())
    {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    *m.tracer_mut() = ModelTracer::with_options(trace, options());
    m
}

fn check_tiny<C: TraceConfig>(trace: C, fault: Option<Fault>) -> Vec<Outcome> {
    let (c, w) = tiny_weights();
    let plans = tiny_plans();
    let mut m = batch_model(&w, &c, None, trace.clone());
    m.set_fault(fault);
    let batched = run_batch(&mut m, &plans);
    for (i, (b, p)) in batched.iter().zip(&plans).enumerate() {
        let alone = run_alone(&w, &c, trace.clone(), fault, p);
        assert_same(&format!("tiny sequence {i}"), b, &alone);
    }
    assert_eq!(m.tracer().sequences().count(), 0, "every lane released");
    batched
}

#[test]
fn tiny_sequences_batched_give_the_bits_of_each_alone() {
    let out = check_tiny(Disabled, None);
    // The evicting sequence evicted, as it does alone.
    assert!(out[3].cache.evictions > 0);
    assert_eq!(out[3].cache.tokens.len(), 16);
}

#[test]
fn tiny_sequences_traced_full_record_what_each_alone_records() {
    let out = check_tiny(Full, None);
    for o in &out {
        assert!(!o.forwards.is_empty());
        assert!(o.forwards.iter().all(|f| f.kv_cache.is_some()));
        assert!(o.forwards.iter().any(|f| !f.attention.is_empty()));
    }
    let out = check_tiny(Lightweight, None);
    assert!(out.iter().all(|o| o.summary.is_some()));
}

#[test]
fn a_fault_is_found_at_its_layer_and_position_in_every_sequence() {
    let fault = Fault {
        kind: FaultKind::NaN,
        layer: 2,
        position: Some(6),
    };
    let out = check_tiny(Full, Some(fault));
    for (o, p) in out.iter().zip(tiny_plans()) {
        let s = o.summary.as_ref().unwrap_or_else(|| unreachable!());
        let total = p.prompt.len() + p.decode - 1;
        if total <= 6 {
            assert_eq!(s.first_anomaly, None, "{p:?}");
            continue;
        }
        let a = s
            .first_anomaly
            .unwrap_or_else(|| panic!("{p:?}: no anomaly"));
        assert_eq!(
            (a.kind, a.position, a.layer, a.stage),
            (AnomalyKind::NaN, 6, Some(2), Stage::PostAttn)
        );
    }
}

#[test]
fn lightweight_and_full_models_share_one_copy_of_the_weights() {
    let (c, w) = tiny_weights();
    let plans = tiny_plans();
    let mut light = batch_model(&w, &c, None, Lightweight);
    let mut full = batch_model(&w, &c, None, Full);
    assert_eq!(Arc::strong_count(&w), 3);
    assert!(Arc::ptr_eq(&light.weights, &full.weights));
    // Both at once: interleave their steps on two threads.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_batch(&mut light, &plans));
        let b = s.spawn(|| run_batch(&mut full, &plans[1..]));
        (a.join(), b.join())
    });
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        _ => panic!("a thread panicked"),
    };
    for (i, p) in plans.iter().enumerate() {
        let alone = run_alone(&w, &c, Disabled, None, p);
        assert_eq!(a[i].logits, alone.logits, "lightweight sequence {i}");
        if i > 0 {
            assert_eq!(b[i - 1].logits, alone.logits, "full sequence {i}");
        }
    }
    // The full model's records are full ones.
    assert!(b[0].forwards.iter().any(|f| f.logits.is_some()));
    assert!(a[0].forwards.iter().all(|f| f.logits.is_none()));
    // What-if on one model copies the weights for it alone.
    if let Err(e) = full.set_what_if(&[GgmlType::Q8_0]) {
        panic!("{e}");
    }
    assert!(!Arc::ptr_eq(&light.weights, &full.weights));
    assert!(light.weights.output.what_if.is_empty());
}

#[test]
fn sequences_sharing_an_id_or_sitting_out_compute_as_alone() {
    let (c, w) = tiny_weights();
    let mut m = batch_model(&w, &c, None, Full);
    let options = KvCacheOptions {
        capacity: 64,
        sinks: 4,
        kv_type: KvType::F32,
    };
    let id = model_tracer::SequenceId(7);
    let mut a = m.new_sequence_with_id(id, options);
    let mut b = m.new_sequence_with_id(id, options);
    let mut idle = m.new_sequence(options);
    let (ta, tb) = (tiny_prompt(0, 6), tiny_prompt(1, 4));
    m.forward_batch(&mut [
        SequenceStep::new(&mut a, &ta),
        SequenceStep::new(&mut idle, &[]),
        SequenceStep::new(&mut b, &tb),
    ]);
    m.forward_batch(&mut []);
    assert!(idle.logits().is_empty());
    let plan = |prompt: Vec<u32>| Plan {
        chunk: prompt.len(),
        prompt,
        join: 0,
        decode: 1,
        capacity: 64,
    };
    let alone_a = run_alone(&w, &c, Disabled, None, &plan(ta.clone()));
    let alone_b = run_alone(&w, &c, Disabled, None, &plan(tb.clone()));
    assert_eq!(bits(a.logits()), alone_a.logits[0]);
    assert_eq!(bits(b.logits()), alone_b.logits[0]);
    // The tracer recorded the first segment of the id, not the second.
    let recorded: Vec<usize> = m
        .tracer()
        .sequence_forwards(id)
        .map(|f| f.position)
        .collect();
    assert_eq!(recorded, (0..6).collect::<Vec<_>>());
    let ended = m.end_sequence(a).map(|t| t.summary.forwards);
    assert_eq!(ended, Some(6));
    assert!(m.end_sequence(b).is_none(), "its lane is gone already");
    assert!(m.end_sequence(idle).is_none(), "never seen");
}

/// SmolLM2, when the file is there.
fn smollm2() -> Option<(Config, Arc<Weights>, Option<Arc<Tokenizer>>)> {
    let path = common::real_model()?;
    let m = match Llama::from_gguf(&path, None, Disabled) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    Some((m.config.clone(), m.shared_weights(), m.tokenizer.shared()))
}

#[test]
fn smollm2_sequences_batched_give_the_bits_of_each_alone() {
    let Some((c, w, tok)) = smollm2() else {
        common::require(false, "the SmolLM2 file");
        return;
    };
    let Some(t) = tok.as_deref() else {
        panic!("no tokenizer")
    };
    let texts = [
        "The capital of France is",
        "Once upon a time, in a land far away,",
        "def fibonacci(n):",
        "The three primary colors are",
    ];
    let plans: Vec<Plan> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| Plan {
            prompt: t.encode(text),
            join: [0, 0, 2, 3][i],
            chunk: [64, 3, 5, 1][i],
            decode: [6, 5, 4, 3][i],
            capacity: [512, 512, 12, 512][i],
        })
        .collect();
    let fault = Fault {
        kind: FaultKind::NaN,
        layer: 7,
        position: None,
    };
    for (trace_name, fault) in [("lightweight", None), ("lightweight nan@7", Some(fault))] {
        let mut m = batch_model(&w, &c, tok.clone(), Lightweight);
        m.set_fault(fault);
        let batched = run_batch(&mut m, &plans);
        for (i, (b, p)) in batched.iter().zip(&plans).enumerate() {
            let alone = run_alone(&w, &c, Lightweight, fault, p);
            assert_same(&format!("{trace_name}: {:?}", texts[i]), b, &alone);
            if fault.is_some() {
                let s = b.summary.as_ref().unwrap_or_else(|| unreachable!());
                let a = s.first_anomaly.unwrap_or_else(|| panic!("no anomaly"));
                assert_eq!(
                    (a.kind, a.position, a.layer, a.stage),
                    (AnomalyKind::NaN, 0, Some(7), Stage::PostAttn),
                    "{:?}",
                    texts[i]
                );
            }
        }
        if fault.is_none() {
            // The greedy answer to the first prompt, through the batch path.
            assert_eq!(batched[0].tokens, [7042, 30, 198, 198, 504, 1797]);
        }
    }
}
