//! How a token's logit and rank evolve through the layers (the logit lens).

use crate::stats;

/// One tracked token's logit and rank at each traced layer.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TokenLogitEvolution {
    /// Vocabulary id.
    pub token_id: u32,
    /// Text of the token, for display.
    pub token_text: String,
    /// Logit at each recorded layer, in recording order.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float::vec"))]
    pub logits: Vec<f32>,
    /// Rank at each recorded layer (0 = the highest logit).
    pub ranks: Vec<usize>,
    /// Layer index of each entry, when recorded by the tracer (empty when
    /// entries were recorded by hand, which means layers 0, 1, 2, ...).
    pub layers: Vec<usize>,
}

impl TokenLogitEvolution {
    /// An empty trajectory for `token_id`.
    pub fn new(token_id: u32, token_text: String) -> Self {
        Self {
            token_id,
            token_text,
            ..Self::default()
        }
    }

    /// Makes `self` a fresh, empty trajectory of `token_id`, keeping its
    /// buffers for reuse.
    pub(crate) fn reuse_for(&mut self, token_id: u32) {
        self.token_id = token_id;
        self.token_text.clear();
        self.logits.clear();
        self.ranks.clear();
        self.layers.clear();
    }

    /// Appends the next layer's logit and rank.
    pub fn record_layer(&mut self, logit: f32, rank: usize) {
        self.logits.push(logit);
        self.ranks.push(rank);
    }

    /// Layer index of entry `i` of [`ranks`](Self::ranks).
    pub fn layer_at(&self, i: usize) -> usize {
        self.layers.get(i).copied().unwrap_or(i)
    }

    /// The layer where the token's rank changed most: the one whose rank
    /// dropped by the most places from the layer before it
    /// (`rank[i-1] - rank[i]`). Ties go to the earliest layer. `None` with
    /// fewer than two layers or when the rank never improved.
    ///
    /// Absolute drops favour moves between large ranks: 500 → 200 counts
    /// for more than 10 → 1. For the layer that brought a token near the
    /// top, see [`decisive_layer_log_rank`](Self::decisive_layer_log_rank).
    pub fn decisive_layer(&self) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for (i, w) in self.ranks.windows(2).enumerate() {
            let drop = w[0].saturating_sub(w[1]);
            if drop > 0 && best.is_none_or(|(_, d)| drop > d) {
                best = Some((i + 1, drop));
            }
        }
        best.map(|(i, _)| self.layer_at(i))
    }

    /// The layer whose rank improved most on a log scale (the largest drop
    /// of `ln(1 + rank)`), because going from rank 10 to 1 decides more than
    /// going from 1000 to 900: with a vocabulary of tens of thousands of
    /// tokens, absolute drops are dominated by moves between ranks that
    /// never come near being sampled. Ties go to the earliest layer. `None`
    /// with fewer than two layers or when the rank never improved.
    pub fn decisive_layer_log_rank(&self) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, w) in self.ranks.windows(2).enumerate() {
            let gain = (1.0 + w[0] as f64).ln() - (1.0 + w[1] as f64).ln();
            if gain > 0.0 && best.is_none_or(|(_, g)| gain > g) {
                best = Some((i + 1, gain));
            }
        }
        best.map(|(i, _)| self.layer_at(i))
    }

    /// The first layer from which the token stays at rank 0 until the end:
    /// where it won. `None` if it is not the top token at the last layer.
    pub fn won_at_layer(&self) -> Option<usize> {
        if self.ranks.last() != Some(&0) {
            return None;
        }
        let first = self
            .ranks
            .iter()
            .rposition(|&r| r != 0)
            .map_or(0, |i| i + 1);
        Some(self.layer_at(first))
    }

    /// Rank at the last recorded layer.
    pub fn final_rank(&self) -> Option<usize> {
        self.ranks.last().copied()
    }
}

/// The logit-lens record of one forward pass: the sampling settings and the
/// trajectories of the tracked tokens.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LogitEvolutionTrace {
    /// Token position of the forward pass.
    pub position: usize,
    /// Sampling temperature in use (informational).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub temperature: f32,
    /// Nucleus (top-p) threshold in use (informational).
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub top_p: f32,
    /// Tracked tokens.
    pub tokens: Vec<TokenLogitEvolution>,
    /// Token chosen at this position, once known.
    pub selected_token: Option<u32>,
}

impl LogitEvolutionTrace {
    /// An empty record for `position`, sampled with `temperature` and `top_p`.
    pub fn new(position: usize, temperature: f32, top_p: f32) -> Self {
        Self {
            position,
            temperature,
            top_p,
            tokens: Vec::new(),
            selected_token: None,
        }
    }

    /// Starts tracking `token_id` (or returns its existing trajectory).
    pub fn track_token(&mut self, token_id: u32, token_text: String) -> &mut TokenLogitEvolution {
        match self.tokens.iter().position(|t| t.token_id == token_id) {
            Some(i) => &mut self.tokens[i],
            None => {
                self.tokens
                    .push(TokenLogitEvolution::new(token_id, token_text));
                let last = self.tokens.len() - 1;
                &mut self.tokens[last]
            }
        }
    }

    /// The trajectory of `token_id`, if tracked.
    pub fn token(&self, token_id: u32) -> Option<&TokenLogitEvolution> {
        self.tokens.iter().find(|t| t.token_id == token_id)
    }

    /// Rank of `token_id` in `logits`: how many logits are strictly greater
    /// (0 = the top token). An id outside the vocabulary ranks last
    /// (`logits.len()`); a NaN logit ranks below every number.
    pub fn compute_rank(logits: &[f32], token_id: usize) -> usize {
        stats::rank_of(logits, token_id).unwrap_or(logits.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_f254_logit_rank_and_decisive_layer() {
        let mut trace = LogitEvolutionTrace::new(100, 0.7, 0.9);
        let token = trace.track_token(42, "hello".to_string());
        token.record_layer(0.5, 500);
        token.record_layer(1.0, 200);
        token.record_layer(3.0, 10);
        token.record_layer(5.0, 1);
        // The largest drop in places is 500 -> 200, at layer 1 ...
        assert_eq!(token.decisive_layer(), Some(1));
        // ... while on the log scale 200 -> 10 (ln(201/11)) beats both
        // ln(501/201) and ln(11/2): layer 2.
        assert_eq!(token.decisive_layer_log_rank(), Some(2));
        assert_eq!(token.won_at_layer(), None);
        token.record_layer(6.0, 0);
        assert_eq!(token.won_at_layer(), Some(4));
        assert_eq!(
            LogitEvolutionTrace::compute_rank(&[1.0, 5.0, 3.0, 2.0, 4.0], 1),
            0
        );
        assert_eq!(
            LogitEvolutionTrace::compute_rank(&[1.0, 5.0, 3.0, 2.0, 4.0], 0),
            4
        );
    }

    #[test]
    fn out_of_range_and_nan_ranks_are_last() {
        let l = [1.0, f32::NAN, 3.0];
        assert_eq!(LogitEvolutionTrace::compute_rank(&l, 99), 3);
        assert_eq!(LogitEvolutionTrace::compute_rank(&l, 1), 2);
        assert_eq!(LogitEvolutionTrace::compute_rank(&[], 0), 0);
    }

    #[test]
    fn decisive_layer_needs_an_improvement() {
        let mut t = TokenLogitEvolution::new(1, "a".into());
        assert_eq!(t.decisive_layer(), None);
        assert_eq!(t.decisive_layer_log_rank(), None);
        t.record_layer(1.0, 5);
        assert_eq!(t.decisive_layer(), None);
        assert_eq!(t.decisive_layer_log_rank(), None);
        t.record_layer(0.5, 9);
        assert_eq!(t.decisive_layer(), None);
        assert_eq!(t.decisive_layer_log_rank(), None);
        t.layers = vec![10, 20];
        t.record_layer(2.0, 0);
        t.layers.push(30);
        assert_eq!(t.decisive_layer(), Some(30));
        assert_eq!(t.decisive_layer_log_rank(), Some(30));
        assert_eq!(t.won_at_layer(), Some(30));
    }

    #[test]
    fn the_two_decisive_rules_part_ways_and_break_ties_early() {
        let mut t = TokenLogitEvolution::new(1, "a".into());
        // Drops of 900 places, then 9: absolute favours the first, log
        // favours the second (ln(1001/101) < ln(10/1)).
        for r in [1000, 100, 100, 1] {
            t.record_layer(0.0, r);
        }
        t.layers = vec![3, 5, 7, 9];
        assert_eq!(t.decisive_layer(), Some(5));
        assert_eq!(t.decisive_layer_log_rank(), Some(9));

        // Equal drops go to the earliest layer under either rule.
        let mut t = TokenLogitEvolution::new(2, "b".into());
        for r in [8, 4, 8, 4] {
            t.record_layer(0.0, r);
        }
        assert_eq!(t.decisive_layer(), Some(1));
        assert_eq!(t.decisive_layer_log_rank(), Some(1));
    }

    #[test]
    fn tracking_twice_returns_the_same_trajectory() {
        let mut trace = LogitEvolutionTrace::new(0, 1.0, 1.0);
        trace.track_token(7, "x".into()).record_layer(1.0, 3);
        trace.track_token(7, "x".into()).record_layer(2.0, 0);
        assert_eq!(trace.tokens.len(), 1);
        assert_eq!(trace.token(7).unwrap().ranks, vec![3, 0]);
    }
}
