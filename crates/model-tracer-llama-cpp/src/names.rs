//! Which of llama.cpp's named graph tensors are which tracer stage, per
//! architecture.
//!
//! llama.cpp names the nodes of its compute graph as it builds them
//! (`cb(cur, "attn_norm", il)` in `src/models/<arch>.cpp`), the layer
//! appended after a dash: `attn_norm-0`, `l_out-29`; tensors outside the
//! layers have no suffix (`result_norm`). The eval callback sees every node
//! by that name; [`ArchMap::site`] says what a name is to the tracer.

use model_tracer::Stage;

/// What a named tensor is to the tracer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The token embeddings entering layer 0 (`Stage::Embedding`, and the
    /// `Stage::Input` of layer 0).
    Embedding,
    /// A stage of a layer: `PostNorm`, `PostAttn`, `PostFfnNorm`, `PostFfn`
    /// or `Output` (an `Output` is also the next layer's `Input`).
    Layer(usize, Stage),
    /// The attention probabilities of a layer, `[n_kv, n_tokens, n_head]`
    /// (with flash attention off only).
    Softmax(usize),
    /// The hidden state after the final norm (`Stage::FinalNorm`).
    FinalNorm,
}

/// The names an architecture's graph gives the tensors the tracer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchMap {
    /// The architecture these names are for (`general.architecture`), or
    /// `"llama"` for the family default.
    pub arch: &'static str,
    /// The embeddings entering layer 0.
    pub embedding: &'static str,
    /// The attention input after its norm.
    pub post_norm: &'static str,
    /// What the attention block adds to the residual stream.
    pub post_attn: &'static str,
    /// The feed-forward input after its norm.
    pub post_ffn_norm: &'static str,
    /// What the feed-forward block adds to the residual stream.
    pub post_ffn: &'static str,
    /// The residual stream leaving the layer.
    pub output: &'static str,
    /// The attention probabilities.
    pub softmax: &'static str,
    /// The final norm.
    pub final_norm: &'static str,
}

/// The llama graph (`src/models/llama.cpp`) and the many graphs written
/// after it.
pub const LLAMA: ArchMap = ArchMap {
    arch: "llama",
    embedding: "embd",
    post_norm: "attn_norm",
    post_attn: "attn_out",
    post_ffn_norm: "ffn_norm",
    post_ffn: "ffn_out",
    output: "l_out",
    softmax: "kq_soft_max",
    final_norm: "result_norm",
};

/// Gemma 3 (`src/models/gemma3.cpp`): the embeddings scaled by
/// `sqrt(n_embd)`, and a norm after the attention and after the FFN, whose
/// outputs are what the residual adds take.
pub const GEMMA3: ArchMap = ArchMap {
    arch: "gemma3",
    embedding: "inp_scaled",
    post_norm: "attn_norm",
    post_attn: "attn_post_norm",
    post_ffn_norm: "ffn_norm",
    post_ffn: "ffn_post_norm",
    output: "l_out",
    softmax: "kq_soft_max",
    final_norm: "result_norm",
};

impl ArchMap {
    /// The names of the architecture `arch` (`general.architecture`): its
    /// own where this crate knows them, else the llama names, of which a
    /// graph that does not use one simply records nothing at that stage.
    pub fn for_arch(arch: &str) -> Self {
        match arch {
            "gemma3" => GEMMA3,
            _ => LLAMA,
        }
    }

    /// Whether this map was written for `arch` rather than being the
    /// default.
    pub fn is_known(&self, arch: &str) -> bool {
        self.arch == arch
    }

    /// What the tensor named `name` is, in a model of `layers` layers;
    /// `None` for a tensor the tracer does not read (or a layer index at or
    /// beyond `layers`).
    pub fn site(&self, name: &str, layers: usize) -> Option<Site> {
        match name.rsplit_once('-') {
            Some((base, il)) if !il.is_empty() && il.bytes().all(|b| b.is_ascii_digit()) => {
                let layer: usize = il.parse().ok().filter(|&l| l < layers)?;
                let stage = [
                    (self.post_norm, Stage::PostNorm),
                    (self.post_attn, Stage::PostAttn),
                    (self.post_ffn_norm, Stage::PostFfnNorm),
                    (self.post_ffn, Stage::PostFfn),
                    (self.output, Stage::Output),
                ]
                .into_iter()
                .find(|(n, _)| *n == base)
                .map(|(_, s)| s);
                match stage {
                    Some(s) => Some(Site::Layer(layer, s)),
                    None if base == self.softmax => Some(Site::Softmax(layer)),
                    None => None,
                }
            }
            _ if name == self.embedding => Some(Site::Embedding),
            _ if name == self.final_norm => Some(Site::FinalNorm),
            _ => None,
        }
    }

    /// The name of `stage` of layer `layer` in this graph (`None` for the
    /// stages outside the layers and `Input`, which is the tensor before).
    pub fn layer_name(&self, layer: usize, stage: Stage) -> Option<String> {
        let base = match stage {
            Stage::PostNorm => self.post_norm,
            Stage::PostAttn => self.post_attn,
            Stage::PostFfnNorm => self.post_ffn_norm,
            Stage::PostFfn => self.post_ffn,
            Stage::Output => self.output,
            _ => return None,
        };
        Some(format!("{base}-{layer}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_names_map_to_their_stages() {
        let m = ArchMap::for_arch("llama");
        assert_eq!(
            m.site("attn_norm-0", 30),
            Some(Site::Layer(0, Stage::PostNorm))
        );
        assert_eq!(
            m.site("attn_out-12", 30),
            Some(Site::Layer(12, Stage::PostAttn))
        );
        assert_eq!(
            m.site("ffn_out-29", 30),
            Some(Site::Layer(29, Stage::PostFfn))
        );
        assert_eq!(m.site("l_out-7", 30), Some(Site::Layer(7, Stage::Output)));
        assert_eq!(m.site("kq_soft_max-3", 30), Some(Site::Softmax(3)));
        assert_eq!(m.site("embd", 30), Some(Site::Embedding));
        assert_eq!(m.site("result_norm", 30), Some(Site::FinalNorm));
        // Not read: other nodes, layers past the model, malformed suffixes.
        assert_eq!(m.site("ffn_inp-0", 30), None);
        assert_eq!(m.site("kqv_out-0", 30), None);
        assert_eq!(m.site("l_out-30", 30), None);
        assert_eq!(m.site("l_out-", 30), None);
        assert_eq!(m.site("l_out-1x", 30), None);
        assert_eq!(m.site("l_out-99999999999999999999999", 30), None);
        assert_eq!(m.site("", 30), None);
        assert_eq!(m.site("result_output", 30), None);
    }

    #[test]
    fn gemma3_takes_the_post_norms_as_the_blocks_outputs() {
        let m = ArchMap::for_arch("gemma3");
        assert!(m.is_known("gemma3"));
        assert_eq!(
            m.site("attn_post_norm-5", 18),
            Some(Site::Layer(5, Stage::PostAttn))
        );
        assert_eq!(
            m.site("ffn_post_norm-17", 18),
            Some(Site::Layer(17, Stage::PostFfn))
        );
        assert_eq!(m.site("ffn_out-17", 18), None);
        assert_eq!(m.site("inp_scaled", 18), Some(Site::Embedding));
        assert_eq!(m.site("embd", 18), None);
        assert_eq!(
            m.layer_name(4, Stage::PostFfn).as_deref(),
            Some("ffn_post_norm-4")
        );
    }

    #[test]
    fn an_unknown_architecture_gets_the_llama_names() {
        let m = ArchMap::for_arch("qwen2");
        assert_eq!(m, LLAMA);
        assert!(!m.is_known("qwen2"));
    }
}
