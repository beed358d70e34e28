//! Wall-clock times of a generation, as llama.cpp reports them: printed
//! after the run and recorded in its JSON document.

use model_tracer_llama::model::Generation;

/// Wall-clock times of a run: prompt evaluation (until the first generated
/// token) and generation (the rest).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Seconds the model took to load.
    pub load_secs: f64,
    /// Prompt positions computed (not reused from the cache).
    pub prompt_positions: usize,
    /// Seconds until the first generated token.
    pub prompt_secs: f64,
    /// Tokens generated.
    pub generated: usize,
    /// Forwards after the first generated token.
    pub generation_forwards: usize,
    /// Seconds from the first generated token to the end.
    pub generation_secs: f64,
}

impl Timing {
    /// The times of `g`, its first token after `first_token` seconds and
    /// its end after `end`.
    pub fn new(load_secs: f64, g: &Generation, first_token: f64, end: f64) -> Self {
        Self {
            load_secs,
            prompt_positions: g.computed_prompt_positions,
            prompt_secs: first_token,
            generated: g.tokens.len(),
            // The last generated token is not fed back.
            generation_forwards: g.tokens.len().saturating_sub(1),
            generation_secs: end - first_token,
        }
    }

    /// The `timing` object of the run's JSON document.
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "load_s": self.load_secs,
            "prompt_positions": self.prompt_positions,
            "prompt_eval_s": self.prompt_secs,
            "generated_tokens": self.generated,
            "generation_forwards": self.generation_forwards,
            "generation_s": self.generation_secs,
        })
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        write!(
            f,
            "prompt eval: {} positions in {:.2} s ({:.1} tokens/s)\n\
             generation:  {} tokens, {} forwards in {:.2} s ({:.1} tokens/s)",
            self.prompt_positions,
            self.prompt_secs,
            rate(self.prompt_positions, self.prompt_secs),
            self.generated,
            self.generation_forwards,
            self.generation_secs,
            rate(self.generation_forwards, self.generation_secs),
        )
    }
}
