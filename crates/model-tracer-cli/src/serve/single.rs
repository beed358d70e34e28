//! An [`Engine`] of one sequence at a time on the one-sequence decoder: a
//! model per trace level, its KV cache cleared for each new sequence.

use model_tracer::{Disabled, Full, Lightweight, ModelTracer, TraceConfig};
use model_tracer_llama::model::Llama;

use super::engine::{
    outcome, Engine, Level, SeqId, SharedBuf, StepWork, TraceContext, TraceOutcome,
};

/// One model of a level, and the sequence it runs.
struct Slot<C: TraceConfig> {
    model: Llama<C>,
    config: C,
    running: Option<(SeqId, SharedBuf)>,
}

impl<C: TraceConfig> Slot<C> {
    fn new(model: Llama<C>, config: C) -> Self {
        Self {
            model,
            config,
            running: None,
        }
    }
}

/// One sequence at a time, on the model of its level.
pub struct SingleEngine {
    off: Option<Slot<Disabled>>,
    light: Option<Slot<Lightweight>>,
    full: Option<Slot<Full>>,
    context: TraceContext,
    next: u64,
}

impl SingleEngine {
    /// An engine over the models given, one per level it serves.
    pub fn new(
        off: Option<Llama<Disabled>>,
        light: Option<Llama<Lightweight>>,
        full: Option<Llama<Full>>,
        context: TraceContext,
    ) -> Self {
        Self {
            off: off.map(|m| Slot::new(m, Disabled)),
            light: light.map(|m| Slot::new(m, Lightweight)),
            full: full.map(|m| Slot::new(m, Full)),
            context,
            next: 0,
        }
    }

    fn busy(&self) -> bool {
        self.off.as_ref().is_some_and(|s| s.running.is_some())
            || self.light.as_ref().is_some_and(|s| s.running.is_some())
            || self.full.as_ref().is_some_and(|s| s.running.is_some())
    }
}

fn start<C: TraceConfig>(slot: &mut Slot<C>, context: &TraceContext, id: SeqId) {
    slot.model.clear_kv_cache();
    let (tracer, buf) = context.tracer(slot.config.clone());
    *slot.model.tracer_mut() = tracer;
    slot.running = Some((id, buf));
}

fn step<C: TraceConfig>(slot: &mut Slot<C>, work: &StepWork) -> bool {
    if slot.running.as_ref().is_none_or(|(id, _)| *id != work.seq) {
        return false;
    }
    match work.tokens.as_slice() {
        [one] => {
            slot.model.forward(*one);
        }
        many => {
            slot.model.forward_chunks(many);
        }
    }
    true
}

fn finish<C: TraceConfig>(slot: &mut Slot<C>, seq: SeqId) -> Option<TraceOutcome> {
    let (_, buf) = slot.running.take_if(|(id, _)| *id == seq)?;
    let out = outcome(slot.model.tracer(), &buf);
    *slot.model.tracer_mut() = ModelTracer::new(slot.config.clone());
    slot.model.clear_kv_cache();
    Some(out)
}

impl Engine for SingleEngine {
    fn capacity(&self) -> usize {
        1
    }

    fn has_level(&self, level: Level) -> bool {
        match level {
            Level::Off => self.off.is_some(),
            Level::Lightweight => self.light.is_some(),
            Level::Full => self.full.is_some(),
        }
    }

    fn start(&mut self, level: Level, _positions: usize) -> Result<SeqId, String> {
        if self.busy() {
            return Err("the engine runs one sequence at a time".into());
        }
        let id = SeqId(self.next);
        self.next += 1;
        let context = &self.context;
        match level {
            Level::Off => self.off.as_mut().map(|s| start(s, context, id)),
            Level::Lightweight => self.light.as_mut().map(|s| start(s, context, id)),
            Level::Full => self.full.as_mut().map(|s| start(s, context, id)),
        }
        .ok_or_else(|| format!("no model at trace level {}", level.name()))?;
        Ok(id)
    }

    fn step(&mut self, work: &[StepWork]) -> Result<(), String> {
        for w in work {
            let ran = self.off.as_mut().is_some_and(|s| step(s, w))
                || self.light.as_mut().is_some_and(|s| step(s, w))
                || self.full.as_mut().is_some_and(|s| step(s, w));
            if !ran {
                return Err(format!("no sequence {}", w.seq.0));
            }
        }
        Ok(())
    }

    fn logits(&self, seq: SeqId) -> Option<&[f32]> {
        let of =
            |running: &Option<(SeqId, SharedBuf)>| running.as_ref().is_some_and(|r| r.0 == seq);
        if let Some(s) = self.off.as_ref().filter(|s| of(&s.running)) {
            return Some(s.model.logits());
        }
        if let Some(s) = self.light.as_ref().filter(|s| of(&s.running)) {
            return Some(s.model.logits());
        }
        self.full
            .as_ref()
            .filter(|s| of(&s.running))
            .map(|s| s.model.logits())
    }

    fn finish(&mut self, seq: SeqId) -> TraceOutcome {
        self.off
            .as_mut()
            .and_then(|s| finish(s, seq))
            .or_else(|| self.light.as_mut().and_then(|s| finish(s, seq)))
            .or_else(|| self.full.as_mut().and_then(|s| finish(s, seq)))
            .unwrap_or_default()
    }
}
