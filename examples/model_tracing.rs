//! Traces a small hand-written model with every trace system on, injects a
//! NaN at one layer, and prints what the tracer saw.
//!
//! Run: `cargo run --release --example model_tracing`

use model_tracer::{BrickId, Full, KvCacheStateTrace, ModelTracer, QuantType, Stage, TraceConfig};

const DIM: usize = 64;
const LAYERS: usize = 4;

/// A toy residual network shaped like a decoder: per layer a "norm", a
/// mixing matmul whose weights are rounded to 1/16 (the "quantized" path),
/// and a residual add.
struct Toy<C: TraceConfig> {
    weights: Vec<Vec<f32>>, // (layers, DIM * DIM)
    tracer: ModelTracer<C>,
    history: Vec<Vec<f32>>, // per position, the hidden state (stands in for the KV cache)
}

impl<C: TraceConfig> Toy<C> {
    fn new(config: C) -> Self {
        let mut seed = 0x9e37_79b9u32;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32 - 0.5) * 0.3
        };
        let weights = (0..LAYERS)
            .map(|_| (0..DIM * DIM).map(|_| rand()).collect())
            .collect();
        Self {
            weights,
            tracer: ModelTracer::new(config),
            history: Vec::new(),
        }
    }

    fn forward(&mut self, pos: usize, inject_nan_at: Option<usize>) -> Vec<f32> {
        let t = &mut self.tracer;
        t.begin_forward(pos);
        let mut x: Vec<f32> = (0..DIM).map(|i| ((i + pos) as f32 * 0.37).sin()).collect();
        t.activation(0, Stage::Embedding, &x);
        for (l, w) in self.weights.iter().enumerate() {
            t.activation(l, Stage::Input, &x);
            let rms = (x.iter().map(|v| v * v).sum::<f32>() / DIM as f32 + 1e-5).sqrt();
            let normed: Vec<f32> = x.iter().map(|v| v / rms).collect();
            t.activation(l, Stage::PostNorm, &normed);
            let matvec = |round: bool, out: &mut [f32]| {
                for (r, o) in out.iter_mut().enumerate() {
                    let row = &w[r * DIM..(r + 1) * DIM];
                    *o = row
                        .iter()
                        .zip(&normed)
                        .map(|(a, b)| {
                            if round {
                                (a * 16.0).round() / 16.0 * b
                            } else {
                                a * b
                            }
                        })
                        .sum();
                }
            };
            let mut update = vec![0.0; DIM];
            matvec(true, &mut update);
            if inject_nan_at == Some(l) {
                update[7] = f32::NAN;
            }
            t.quant_error(BrickId::FfnDown, l, QuantType::Q4_0, &update, |r| {
                matvec(false, r)
            });
            t.activation(l, Stage::PostFfn, &update);
            // Attention over earlier positions: softmax of dot products.
            let scores: Vec<f32> = self
                .history
                .iter()
                .map(|h| h[l] * x[l])
                .chain([1.0])
                .collect();
            let m = scores.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f32 = e.iter().sum();
            let p: Vec<f32> = e.iter().map(|v| v / z).collect();
            t.attention(l, 0, pos, &p);
            t.residual(l, &x, &update);
            x.iter_mut().zip(&update).for_each(|(a, b)| *a += b);
            t.activation(l, Stage::Output, &x);
            t.logit_lens(l, DIM, |out| out.copy_from_slice(&x));
        }
        t.final_logits(&x);
        self.history.push(x.clone());
        let n = self.history.len();
        t.kv_state(|| {
            let mut s = KvCacheStateTrace::new(pos, 64);
            s.valid_positions = n;
            s.cache_size_bytes = n * DIM * 4;
            s.computed_positions = 1;
            s.reused_positions = n - 1;
            s.cache_hit_rate = (n - 1) as f32 / n as f32;
            s
        });
        if let Some(anomaly) = t.end_forward() {
            println!("anomaly: {anomaly}");
        }
        x
    }
}

fn main() {
    let mut model = Toy::new(Full);
    for pos in 0..12 {
        let inject = (pos == 9).then_some(2);
        model.forward(pos, inject);
    }
    println!("{}", model.tracer.summary());
}
