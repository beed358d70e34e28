//! A run rebuilt from its JSON Lines trace, to look at later, elsewhere.
//!
//! [`ReplayedTrace::read_jsonl`] reads the rows a [`JsonlSink`] wrote and
//! folds their forwards into a tracer again
//! ([`ModelTracer::replay_forward`]): the session summary, the retained
//! forwards and the KV steps are those of the tracer that wrote the stream,
//! and [`report_input`](ReplayedTrace::report_input) gives the HTML report
//! of the run, the same one the run itself would have written.
//!
//! [`JsonlSink`]: crate::JsonlSink

use std::collections::BTreeMap;
use std::io::BufRead;

use crate::config::ModelTracerConfig;
use crate::model_info::ModelInfo;
use crate::read::{no_row, JsonlReader, JsonlRow, ReadError, SequenceChoice};
use crate::report::ReportInput;
use crate::stage::Stage;
use crate::tracer::ModelTracer;
use crate::ForwardTrace;

/// Forwards a replay keeps in detail unless told otherwise: older ones are
/// folded into the summary only, as in a tracer that ran that long.
pub const DEFAULT_REPLAY_FORWARDS: usize = 1024;

/// A traced run read back from its JSON Lines stream.
#[derive(Debug, Clone)]
pub struct ReplayedTrace {
    tracer: ModelTracer<ModelTracerConfig>,
    model: ModelInfo,
    model_named: bool,
    texts: BTreeMap<u32, String>,
    position_tokens: BTreeMap<usize, u32>,
    rows: usize,
}

impl ReplayedTrace {
    /// Reads every row of `input` and replays it into a tracer that keeps
    /// the last `max_forwards` forwards in detail (at least 1). The tracer
    /// traces the systems the rows' `config` names; rows without one (a
    /// sink used outside a tracer) trace what the first row holds. The
    /// model is the rows' `model`, else what the rows show of it: layers,
    /// hidden size, heads and vocabulary from the recorded statistics.
    ///
    /// # Errors
    ///
    /// The first row that cannot be read (its line and column named), a
    /// row of a second sequence (a trace of forwards over several
    /// sequences: replay one with [`read_jsonl_of`](Self::read_jsonl_of)),
    /// or an input with no row at all.
    pub fn read_jsonl(input: impl BufRead, max_forwards: usize) -> Result<Self, ReadError> {
        Self::read_jsonl_of(input, max_forwards, SequenceChoice::Single)
    }

    /// [`read_jsonl`](Self::read_jsonl) of the rows `choice` keeps: with
    /// [`SequenceChoice::Only`], one sequence of a trace that holds
    /// several, replayed as if it had been traced alone.
    ///
    /// # Errors
    ///
    /// As [`read_jsonl`](Self::read_jsonl); no row of the sequence asked
    /// for.
    pub fn read_jsonl_of(
        input: impl BufRead,
        max_forwards: usize,
        choice: SequenceChoice,
    ) -> Result<Self, ReadError> {
        let mut replay: Option<Self> = None;
        for row in JsonlReader::new(input).of_sequence(choice) {
            let JsonlRow {
                forward,
                model,
                config,
                texts,
            } = row?;
            let r = replay.get_or_insert_with(|| {
                let mut c = config
                    .as_deref()
                    .and_then(ModelTracerConfig::from_description)
                    .unwrap_or_else(|| systems_of(&forward));
                c.max_forwards = max_forwards.max(1);
                Self {
                    tracer: ModelTracer::new(c),
                    model: model.clone().unwrap_or_default(),
                    model_named: model.is_some(),
                    texts: BTreeMap::new(),
                    position_tokens: BTreeMap::new(),
                    rows: 0,
                }
            });
            if let Some(m) = model {
                r.model = m;
                r.model_named = true;
            }
            r.texts.extend(texts);
            if let Some(t) = forward.token {
                r.position_tokens.insert(forward.position, t);
            }
            if !r.model_named {
                r.model.infer_from(&forward);
            }
            r.tracer.replay_forward(forward);
            r.rows += 1;
        }
        replay.ok_or_else(|| no_row(choice))
    }

    /// The tracer the rows were replayed into.
    pub fn tracer(&self) -> &ModelTracer<ModelTracerConfig> {
        &self.tracer
    }

    /// The model, as the rows name or show it.
    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    /// Rows read.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The token id fed at each position the rows name.
    pub fn position_tokens(&self) -> &BTreeMap<usize, u32> {
        &self.position_tokens
    }

    /// The report of the run, under the model name the rows give (or
    /// `name` when they give none).
    pub fn report_input(&self, name: &str) -> ReportInput<'_> {
        let mut model = self.model.clone();
        if model.name.is_empty() {
            model.name = name.to_string();
        }
        let mut input = ReportInput::from_tracer(&self.tracer, model);
        let text = |id: u32| {
            self.texts
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("<{id}>"))
        };
        input.position_text = self
            .position_tokens
            .iter()
            .map(|(&p, &id)| (p, text(id)))
            .collect();
        input.token_text = input
            .token_ids()
            .into_iter()
            .map(|id| (id, text(id)))
            .collect();
        input
    }
}

/// The systems a forward holds records of.
fn systems_of(f: &ForwardTrace) -> ModelTracerConfig {
    ModelTracerConfig {
        trace_activations: f.activations.recorded().next().is_some(),
        trace_attention: !f.attention.is_empty(),
        trace_logits: f.logits.is_some(),
        trace_quant_error: !f.quantization.traces.is_empty() || !f.what_if.is_empty(),
        trace_kv_cache: f.kv_cache.is_some(),
        trace_fingerprints: f.activations.has_fingerprints(),
        ..ModelTracerConfig::default()
    }
}

impl ModelInfo {
    /// Widens `self` to what `f` shows of the model: layers and hidden
    /// size from the activation statistics, vocabulary from the logits',
    /// heads from the attention records, cache capacity from the KV state.
    fn infer_from(&mut self, f: &ForwardTrace) {
        for (layer, stage, st) in f.activations.recorded() {
            if let Some(l) = layer {
                self.layers = self.layers.max(l.saturating_add(1));
            }
            match stage {
                Stage::Logits => self.vocab = self.vocab.max(st.count),
                _ => self.dim = self.dim.max(st.count),
            }
        }
        for a in &f.attention {
            self.layers = self.layers.max(a.layer_idx.saturating_add(1));
            self.heads = self.heads.max(a.head_idx.saturating_add(1));
        }
        if let Some(kv) = &f.kv_cache {
            self.kv_capacity = self.kv_capacity.max(kv.max_positions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Full, JsonlSink, Lightweight, SinkHandle};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(b);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().map(|v| v.clone()).unwrap_or_default()
        }
    }

    fn run<C: crate::TraceConfig>(tracer: &mut ModelTracer<C>, forwards: usize) {
        for pos in 0..forwards {
            tracer.begin_forward(pos);
            tracer.input_token(100 + pos as u32);
            for layer in 0..3 {
                let x: Vec<f32> = (0..8).map(|i| (i + layer + pos) as f32 * 0.25).collect();
                tracer.activation(layer, Stage::Input, &x);
                tracer.residual(layer, &x, &x);
                let weights: Vec<f32> = (0..=pos).map(|i| 1.0 / (i + 1) as f32).collect();
                tracer.attention(layer, 1, pos, &weights);
                tracer.activation(layer, Stage::Output, &x);
            }
            let logits: Vec<f32> = (0..16).map(|i| ((i * 7 + pos) % 16) as f32).collect();
            for layer in 0..3 {
                tracer.logit_lens(layer, 16, |out| out.copy_from_slice(&logits));
            }
            tracer.final_logits(&logits);
            tracer.selected_token(3);
            tracer.end_forward();
        }
    }

    #[test]
    fn a_replayed_stream_has_the_summary_and_forwards_of_the_run() {
        let out = Shared::default();
        let mut t = ModelTracer::new(Full);
        let sink = JsonlSink::new(out.clone())
            .with_vocabulary(|id| format!("tok{id}"))
            .with_model(ModelInfo {
                name: "toy".into(),
                layers: 3,
                ..ModelInfo::default()
            });
        t.set_sink(Some(SinkHandle::new(sink)));
        run(&mut t, 5);
        let replay = ReplayedTrace::read_jsonl(&out.bytes()[..], 64);
        let Ok(replay) = replay else {
            panic!("{replay:?}");
        };
        assert_eq!(replay.rows(), 5);
        assert_eq!(replay.model().name, "toy");
        let ours: Vec<_> = t.forwards().collect();
        let theirs: Vec<_> = replay.tracer().forwards().collect();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            // The lens token texts come from the vocabulary, not the tracer.
            let mut b = (*b).clone();
            if let (Some(la), Some(lb)) = (&a.logits, &mut b.logits) {
                for (ta, tb) in la.tokens.iter().zip(&mut lb.tokens) {
                    assert_eq!(tb.token_text, format!("tok{}", tb.token_id));
                    tb.token_text = ta.token_text.clone();
                }
            }
            assert_eq!(**a, b);
        }
        assert_eq!(t.summary(), replay.tracer().summary());
        let input = replay.report_input("ignored");
        assert_eq!(input.position_text[&4], "tok104");
        assert_eq!(input.token_text.get(&3).map(String::as_str), Some("tok3"));
    }

    #[test]
    fn without_a_named_model_the_rows_show_its_shape() {
        let out = Shared::default();
        let mut t = ModelTracer::new(Lightweight);
        // A sink used on its own: no config, no model.
        let mut sink = JsonlSink::new(out.clone());
        run(&mut t, 2);
        for f in t.forwards() {
            if let Err(e) = sink.write(f) {
                panic!("{e}");
            }
        }
        let replay = ReplayedTrace::read_jsonl(&out.bytes()[..], 1);
        let Ok(replay) = replay else {
            panic!("{replay:?}");
        };
        assert_eq!(replay.model().layers, 3);
        assert_eq!(replay.model().dim, 8);
        assert_eq!(replay.tracer().forwards().count(), 1, "max_forwards 1");
        assert_eq!(replay.tracer().summary().forwards, 2);
        assert_eq!(replay.tracer().summary().config, "activations");
        assert_eq!(replay.report_input("trace.jsonl").model.name, "trace.jsonl");
    }

    /// Counts at `usize::MAX` saturate when folded into the session, and
    /// statistics whose minimum is above their maximum merge without the
    /// panic of `f32::clamp`.
    #[test]
    fn hostile_counts_saturate_and_disordered_bounds_merge() {
        let m = usize::MAX;
        let act = |p: usize, stage: &str, nan: usize, inf: usize| {
            format!(
                r#"{{"position":{p},"config":"lightweight","act_layer":[0],"act_stage":["{stage}"],"act_count":[{m}],"act_min":[5],"act_max":[-5],"act_mean":[1],"act_std":[1],"act_l2_norm":[1],"act_nan_count":[{nan}],"act_inf_count":[{inf}]}}"#
            )
        };
        let kv = |p: usize| {
            format!(
                r#"{{"position":{p},"config":"lightweight","kv_step":{p},"kv_max_positions":0,"kv_valid_positions":1,"kv_bytes":1,"kv_hit_rate":"NaN","kv_evictions":{m},"kv_reused":{m},"kv_computed":{m}}}"#
            )
        };
        let rows = [
            act(0, "input", 0, 0),
            act(1, "input", 0, 0),
            act(2, "output", m, m),
            kv(3),
            kv(4),
        ];
        let replay = ReplayedTrace::read_jsonl(rows.join("\n").as_bytes(), 8);
        let Ok(replay) = replay else {
            panic!("{replay:?}");
        };
        let s = replay.tracer().summary();
        assert_eq!(s.forwards, 5);
        assert_eq!(s.layers[0].input.count, m);
        assert_eq!(s.layers[0].input.mean, 1.0, "kept, not clamped");
        assert_eq!(s.layers[0].non_finite, m);
        let kv = s.kv_cache.unwrap_or_default();
        assert_eq!(
            (
                kv.steps,
                kv.total_evictions,
                kv.total_reused,
                kv.total_computed
            ),
            (2, m, m, m)
        );
        let input = replay.report_input("hostile");
        let mut page = Vec::new();
        assert!(crate::report::write_html(&mut page, &input).is_ok());
    }

    /// The report names positions in a map: a row at position 10^18 costs
    /// one entry, not a vector of 10^18 texts.
    #[test]
    fn a_huge_position_costs_one_text() {
        let rows = "{\"position\":1000000000000000000,\"token\":7,\"token_text\":\"x\",\
                    \"kv_step\":0,\"kv_max_positions\":4,\"kv_valid_positions\":1,\
                    \"kv_bytes\":8,\"kv_hit_rate\":0,\"kv_evictions\":0,\"kv_reused\":0,\
                    \"kv_computed\":1}";
        let replay = ReplayedTrace::read_jsonl(rows.as_bytes(), 8);
        let Ok(replay) = replay else {
            panic!("{replay:?}");
        };
        let input = replay.report_input("far");
        assert_eq!(input.position_text.len(), 1);
        assert_eq!(input.position_text[&1_000_000_000_000_000_000], "x");
        let mut page = Vec::new();
        assert!(crate::report::write_html(&mut page, &input).is_ok());
    }

    #[test]
    fn an_empty_stream_is_an_error() {
        let e = ReplayedTrace::read_jsonl(&b"\n\n"[..], 8).err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("the trace holds no row")
        );
    }
}
