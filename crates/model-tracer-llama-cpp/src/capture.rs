//! The eval callback: what it asks llama.cpp for, how it copies a graph
//! tensor out, and how the copies reach the tracer's hooks.
//!
//! llama.cpp calls the callback twice per graph node: with `ask = true`
//! before computing, to learn whether the node is to be observed (the
//! scheduler then ends its compute batch at that node), and with
//! `ask = false` once the node is computed, with its data in place. The
//! observed tensors are copied to f32 rows and handed on:
//!
//! - while all the rows of the decode are there, rows `0..t` go to the
//!   tracer's rows hooks of the forward in flight;
//! - llama.cpp computes its last layer from the attention's residual add
//!   on, the final norm and the LM head only for the rows whose output the
//!   batch asks for (`ggml_get_rows` on `inp_out_ids` in every graph). When
//!   only the last row is an output, the forward in flight holds the other
//!   `t - 1` rows, and the last row of every tensor is kept aside (a few
//!   vectors per layer) to be recorded, after the decode, as a forward of
//!   its own: each position is recorded with what llama.cpp computed for it,
//!   and a stage llama.cpp did not compute for a position is not recorded
//!   for it.

use std::ffi::{c_void, CStr};

use llama_cpp_sys_2 as sys;
use model_tracer::{traced, ModelTracer, Stage, TraceConfig};
use model_tracer_llama::model::{Fault, FaultKind};

use crate::names::{ArchMap, Site};

/// Elements of one tensor the callback copies at most (2^28 values, 1 GiB
/// of f32): a larger node is not recorded.
const MAX_COPY: usize = 1 << 28;

/// Layer stages the callback can receive, in forward order: the index of a
/// stage in the kept-aside last row.
const STAGES: [Stage; 5] = [
    Stage::PostNorm,
    Stage::PostAttn,
    Stage::PostFfnNorm,
    Stage::PostFfn,
    Stage::Output,
];

fn stage_index(stage: Stage) -> Option<usize> {
    STAGES.iter().position(|&s| s == stage)
}

/// A test-only change of the copy of the tensor it names, before its
/// hook.
pub type Perturbation = (String, fn(&mut [f32]));

/// The decode in flight: which positions, and whether the last row is
/// recorded apart.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Plan {
    /// Position of row 0.
    pub start: usize,
    /// Rows of the batch.
    pub rows: usize,
    /// Only the last row is an output: rows `0..rows - 1` stream into the
    /// forward in flight, the last row is kept aside.
    pub split: bool,
}

impl Plan {
    /// Rows of the forward in flight during the decode.
    pub fn streamed(&self) -> usize {
        if self.split {
            self.rows - 1
        } else {
            self.rows
        }
    }
}

/// One vector kept aside for the last row.
#[derive(Debug, Clone, Default)]
pub(crate) struct Kept {
    pub data: Vec<f32>,
    pub present: bool,
}

impl Kept {
    fn keep(&mut self, row: &[f32]) {
        self.data.clear();
        self.data.extend_from_slice(row);
        self.present = true;
    }
}

/// The last row of a split decode: every stage of every layer, the
/// embedding, the final norm and each layer's attention row per head.
#[derive(Debug, Clone, Default)]
pub(crate) struct LastRow {
    pub embedding: Kept,
    pub final_norm: Kept,
    /// `[layer][stage index]`.
    pub stages: Vec<[Kept; 5]>,
    /// `[layer]`: `heads × n_kv` weights, and `n_kv`.
    pub attention: Vec<(Kept, usize)>,
}

impl LastRow {
    fn new(layers: usize) -> Self {
        Self {
            stages: (0..layers).map(|_| Default::default()).collect(),
            attention: (0..layers).map(|_| Default::default()).collect(),
            ..Self::default()
        }
    }

    fn clear(&mut self) {
        self.embedding.present = false;
        self.final_norm.present = false;
        for s in self.stages.iter_mut().flatten() {
            s.present = false;
        }
        for (a, _) in &mut self.attention {
            a.present = false;
        }
    }

    /// Each layer's output, when every layer's is there.
    pub fn outputs(&self) -> Option<Vec<&[f32]>> {
        let out = stage_index(Stage::Output)?;
        self.stages
            .iter()
            .map(|s| s[out].present.then_some(s[out].data.as_slice()))
            .collect()
    }
}

/// The callback's state: the tracer, the names it reads, the decode in
/// flight and the copies.
pub(crate) struct Capture<C: TraceConfig> {
    pub tracer: ModelTracer<C>,
    pub map: ArchMap,
    pub layers: usize,
    pub head_dim: usize,
    pub fault: Option<Fault>,
    pub plan: Plan,
    pub last: LastRow,
    /// Each layer's output, every row of the decode (kept for the logit
    /// lens when every row is an output).
    pub outputs: Vec<Kept>,
    /// Keep [`outputs`](Self::outputs) during this decode.
    pub keep_outputs: bool,
    /// Tensors observed since the counter was last reset.
    pub observed: usize,
    /// A test-only change of a copied tensor before its hook: the tensor's
    /// name and the change.
    pub perturb: Option<Perturbation>,
    /// Why the callback stopped the graph, if it did.
    pub failure: Option<String>,
    scratch: Vec<f32>,
    bytes: Vec<u8>,
}

impl<C: TraceConfig> Capture<C> {
    pub fn new(tracer: ModelTracer<C>, map: ArchMap, layers: usize, head_dim: usize) -> Self {
        Self {
            tracer,
            map,
            layers,
            head_dim,
            fault: None,
            plan: Plan::default(),
            last: LastRow::new(layers),
            outputs: (0..layers).map(|_| Kept::default()).collect(),
            keep_outputs: false,
            observed: 0,
            perturb: None,
            failure: None,
            scratch: Vec::new(),
            bytes: Vec::new(),
        }
    }

    /// Gets ready for a decode of `plan`.
    pub fn start(&mut self, plan: Plan, keep_outputs: bool) {
        self.plan = plan;
        self.keep_outputs = keep_outputs;
        self.last.clear();
        for o in &mut self.outputs {
            o.present = false;
        }
    }

    fn activations_on(&self) -> bool {
        C::ACTIVATIONS && self.tracer.config().activations()
    }

    fn attention_on(&self) -> bool {
        C::ATTENTION && self.tracer.config().attention()
    }

    fn lens_on(&self) -> bool {
        self.tracer.wants_logit_lens()
    }

    /// Whether the callback observes the tensor named `name`: only what an
    /// enabled system needs (no attention matrices without attention
    /// tracing).
    fn wants(&self, name: &str) -> bool {
        match self.map.site(name, self.layers) {
            Some(Site::Softmax(_)) => self.attention_on(),
            Some(Site::Layer(l, s)) => {
                self.activations_on()
                    || (s == Stage::Output && self.lens_on())
                    || self.fault.is_some_and(|f| f.layer == l && f.stage() == s)
            }
            Some(Site::Embedding | Site::FinalNorm) => self.activations_on(),
            None => false,
        }
    }

    /// The observed tensor `t`, computed.
    ///
    /// # Safety
    /// `t` is a tensor the scheduler hands the callback, its data computed.
    unsafe fn observe(&mut self, t: &sys::ggml_tensor) {
        let name = tensor_name(t);
        let Some(site) = self.map.site(&name, self.layers) else {
            return;
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        let copied = copy_tensor(t, &mut scratch, &mut self.bytes);
        if copied {
            self.observed += 1;
            let width = usize::try_from(t.ne[0]).unwrap_or(0);
            let rows = usize::try_from(t.ne[1]).unwrap_or(0);
            if let Site::Layer(layer, stage) = site {
                if let Some(f) = self
                    .fault
                    .filter(|f| f.layer == layer && f.stage() == stage)
                {
                    apply_fault(&f, &mut scratch, width, self.plan.start, self.head_dim);
                    write_back(t, &scratch);
                }
            }
            if let Some((target, change)) = &self.perturb {
                if *target == name {
                    change(&mut scratch);
                }
            }
            match site {
                Site::Softmax(layer) => {
                    let heads = usize::try_from(t.ne[2]).unwrap_or(0);
                    self.attention(layer, &scratch, width, rows, heads);
                }
                _ if t.ne[2] != 1 || t.ne[3] != 1 => {}
                site => self.activation(site, &scratch, width, rows),
            }
        }
        self.scratch = scratch;
    }

    /// Hands the rows of an activation to the hooks, or keeps the last
    /// row aside.
    fn activation(&mut self, site: Site, x: &[f32], width: usize, rows: usize) {
        let plan = self.plan;
        if width == 0 || rows == 0 || x.len() < width * rows {
            return;
        }
        let all = rows == plan.rows;
        if !(all || plan.split && rows == 1) {
            return; // rows that match neither the batch nor its output
        }
        let streamed = if all {
            &x[..plan.streamed() * width]
        } else {
            &[]
        };
        let last = &x[(rows - 1) * width..rows * width];
        if !streamed.is_empty() {
            let tracer = &mut self.tracer;
            match site {
                Site::Embedding => {
                    traced!(C, tracer.activation(0, Stage::Embedding, streamed));
                    traced!(C, tracer.activation(0, Stage::Input, streamed));
                }
                Site::FinalNorm => traced!(C, tracer.activation(0, Stage::FinalNorm, streamed)),
                Site::Layer(l, stage) => {
                    traced!(C, tracer.activation(l, stage, streamed));
                    if stage == Stage::Output {
                        if l + 1 < self.layers {
                            traced!(C, tracer.activation(l + 1, Stage::Input, streamed));
                        }
                        traced!(C, tracer.residual_from_stages(l));
                        if self.keep_outputs {
                            if let Some(o) = self.outputs.get_mut(l) {
                                o.keep(streamed);
                            }
                        }
                    }
                }
                Site::Softmax(_) => {}
            }
        }
        if plan.split {
            match site {
                Site::Embedding => self.last.embedding.keep(last),
                Site::FinalNorm => self.last.final_norm.keep(last),
                Site::Layer(l, stage) => {
                    if let (Some(s), Some(i)) = (self.last.stages.get_mut(l), stage_index(stage)) {
                        s[i].keep(last);
                    }
                }
                Site::Softmax(_) => {}
            }
        }
    }

    /// Hands one layer's attention probabilities, `[heads][rows][n_kv]`,
    /// to the hooks, or keeps the last row of each head aside.
    fn attention(&mut self, layer: usize, p: &[f32], n_kv: usize, rows: usize, heads: usize) {
        let plan = self.plan;
        if rows != plan.rows || n_kv == 0 || p.len() < heads * rows * n_kv {
            return;
        }
        let streamed = plan.streamed();
        for h in 0..heads {
            let block = &p[h * rows * n_kv..(h + 1) * rows * n_kv];
            if streamed > 0 {
                let tracer = &mut self.tracer;
                traced!(
                    C,
                    if tracer.wants_attention(layer, h) {
                        tracer.attention_rows(layer, h, &block[..streamed * n_kv], plan.start + 1);
                    }
                );
            }
        }
        if plan.split {
            if let Some((kept, width)) = self.last.attention.get_mut(layer) {
                kept.data.clear();
                for h in 0..heads {
                    let at = (h * rows + rows - 1) * n_kv;
                    kept.data.extend_from_slice(&p[at..at + n_kv]);
                }
                kept.present = true;
                *width = n_kv;
            }
        }
    }
}

/// The callback llama.cpp calls for each graph node, registered only when
/// the tracer records something.
///
/// # Safety
/// `user_data` is the `Capture<C>` the context was created with, alive and
/// not otherwise borrowed while llama.cpp decodes.
pub(crate) unsafe extern "C" fn eval_callback<C: TraceConfig>(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    if t.is_null() || user_data.is_null() {
        return !ask;
    }
    let capture = &mut *user_data.cast::<Capture<C>>();
    let tensor = &*t;
    // No unwinding into C: a panic stops the graph and is reported.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if ask {
            capture.wants(&tensor_name(tensor))
        } else {
            capture.observe(tensor);
            true
        }
    }));
    match result {
        Ok(answer) => answer,
        Err(_) => {
            capture.failure = Some(format!(
                "the trace callback failed on tensor {:?}",
                tensor_name(tensor)
            ));
            false
        }
    }
}

/// The tensor's name, up to its NUL.
fn tensor_name(t: &sys::ggml_tensor) -> String {
    let bytes: Vec<u8> = t
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Copies the elements of `t` into `out` as f32, row-major
/// (`[i3][i2][i1][i0]`), following its strides `nb`; F32, F16 and BF16
/// tensors only. A tensor outside host memory is first read with
/// `ggml_backend_tensor_get` into `bytes`. Returns whether it copied.
///
/// # Safety
/// `t` is a computed tensor of a live graph.
unsafe fn copy_tensor(t: &sys::ggml_tensor, out: &mut Vec<f32>, bytes: &mut Vec<u8>) -> bool {
    let elem = match t.type_ {
        sys::GGML_TYPE_F32 => 4,
        sys::GGML_TYPE_F16 | sys::GGML_TYPE_BF16 => 2,
        _ => return false,
    };
    let ne = t.ne.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let count = ne.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n));
    let Some(count) = count.filter(|&c| c > 0 && c <= MAX_COPY) else {
        return false;
    };
    let nb = t.nb;
    let base: *const u8 = if !t.buffer.is_null() && sys::ggml_backend_buffer_is_host(t.buffer) {
        t.data.cast::<u8>().cast_const()
    } else {
        let size = sys::ggml_nbytes(t);
        if size == 0 || size > MAX_COPY * 4 {
            return false;
        }
        bytes.resize(size, 0);
        sys::ggml_backend_tensor_get(t, bytes.as_mut_ptr().cast(), 0, size);
        bytes.as_ptr()
    };
    if base.is_null() {
        return false;
    }
    out.clear();
    out.reserve(count);
    for i3 in 0..ne[3] {
        for i2 in 0..ne[2] {
            for i1 in 0..ne[1] {
                let row = base.add(i3 * nb[3] + i2 * nb[2] + i1 * nb[1]);
                match t.type_ {
                    sys::GGML_TYPE_F32 if nb[0] == elem => {
                        let src = std::slice::from_raw_parts(row.cast::<f32>(), ne[0]);
                        out.extend_from_slice(src);
                    }
                    sys::GGML_TYPE_F32 => {
                        out.extend(
                            (0..ne[0]).map(|i0| row.add(i0 * nb[0]).cast::<f32>().read_unaligned()),
                        );
                    }
                    sys::GGML_TYPE_F16 => out.extend((0..ne[0]).map(|i0| {
                        sys::ggml_fp16_to_fp32(row.add(i0 * nb[0]).cast::<u16>().read_unaligned())
                    })),
                    _ => out.extend((0..ne[0]).map(|i0| {
                        let bits = row.add(i0 * nb[0]).cast::<u16>().read_unaligned();
                        f32::from_bits(u32::from(bits) << 16)
                    })),
                }
            }
        }
    }
    true
}

/// Writes `x` back into `t` when `t` is a contiguous f32 tensor in host
/// memory of `x.len()` elements, so that a fault flows on through the rest
/// of llama.cpp's graph.
///
/// # Safety
/// As [`copy_tensor`].
unsafe fn write_back(t: &sys::ggml_tensor, x: &[f32]) {
    let contiguous = t.type_ == sys::GGML_TYPE_F32
        && t.nb[0] == 4
        && usize::try_from(t.ne[0]).is_ok_and(|n0| t.nb[1] == n0 * 4)
        && usize::try_from(t.ne[1] * t.ne[0]).is_ok_and(|n| t.nb[2] == n * 4 || t.ne[2] == 1);
    let host = !t.buffer.is_null() && sys::ggml_backend_buffer_is_host(t.buffer);
    if contiguous && host && !t.data.is_null() && sys::ggml_nelements(t) == x.len() as i64 {
        std::ptr::copy_nonoverlapping(x.as_ptr(), t.data.cast::<f32>(), x.len());
    }
}

/// Applies `fault` to every row (each a position from `start` on) of a
/// stage's tensor `x` of rows of `width`, as the reference decoder does to
/// each position's vector.
fn apply_fault(fault: &Fault, x: &mut [f32], width: usize, start: usize, head_dim: usize) {
    if width == 0 {
        return;
    }
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        if fault.position.is_some_and(|p| p != start + r) {
            continue;
        }
        let at = fault.layer % row.len();
        match fault.kind {
            FaultKind::NaN => row[at] = f32::NAN,
            FaultKind::Inf => row[at] = f32::INFINITY,
            FaultKind::Explode => row.iter_mut().for_each(|v| *v *= 1e8),
            FaultKind::Scale(_) => row.iter_mut().for_each(|v| *v *= 1.01),
            FaultKind::SwapHeads(_) => {
                if row.len() >= 2 * head_dim && head_dim > 0 {
                    let (h0, rest) = row.split_at_mut(head_dim);
                    h0.swap_with_slice(&mut rest[..head_dim]);
                }
            }
        }
    }
}

/// A raw C string's text.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
pub(crate) unsafe fn c_text(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_hit_each_row_or_only_their_position() {
        let mut x = vec![1.0f32; 12];
        let f = Fault {
            kind: FaultKind::NaN,
            layer: 7,
            position: None,
        };
        apply_fault(&f, &mut x, 4, 10, 2);
        assert_eq!(x.iter().filter(|v| v.is_nan()).count(), 3);
        assert!(x[3].is_nan() && x[7].is_nan() && x[11].is_nan());
        let mut y = vec![1.0f32; 12];
        let f = Fault {
            kind: FaultKind::Scale(Stage::PostAttn),
            layer: 1,
            position: Some(11),
        };
        apply_fault(&f, &mut y, 4, 10, 2);
        assert_eq!(&y[..4], &[1.0; 4]);
        assert!(y[4..8].iter().all(|&v| v == 1.01));
        assert_eq!(&y[8..], &[1.0; 4]);
        let mut z: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let f = Fault {
            kind: FaultKind::SwapHeads(Stage::PostAttn),
            layer: 0,
            position: None,
        };
        apply_fault(&f, &mut z, 8, 0, 2);
        assert_eq!(z, vec![2.0, 3.0, 0.0, 1.0, 4.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn the_last_row_has_outputs_only_when_every_layer_kept_one() {
        let mut last = LastRow::new(2);
        assert!(last.outputs().is_none());
        last.stages[0][4].keep(&[1.0, 2.0]);
        assert!(last.outputs().is_none());
        last.stages[1][4].keep(&[3.0, 4.0]);
        assert_eq!(
            last.outputs(),
            Some(vec![&[1.0f32, 2.0][..], &[3.0f32, 4.0][..]])
        );
        last.clear();
        assert!(last.outputs().is_none());
    }
}
