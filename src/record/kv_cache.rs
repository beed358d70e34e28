//! KV cache state per decode step and over a session.

use std::collections::VecDeque;

/// Steps whose state a [`KvCacheSessionTrace`] keeps by default; older steps
/// live on in the session totals only.
pub const DEFAULT_RETAINED_STEPS: usize = 1024;

/// The KV cache after one decode step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KvCacheStateTrace {
    /// Step number (forward pass index, or token position).
    pub step: usize,
    /// Capacity of the cache, in positions.
    pub max_positions: usize,
    /// Positions holding valid keys and values.
    pub valid_positions: usize,
    /// Bytes held by the valid positions (keys and values, all layers).
    pub cache_size_bytes: usize,
    /// Share of the positions this step looked up that were served from the
    /// cache rather than recomputed, in `[0, 1]`.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub cache_hit_rate: f32,
    /// Positions evicted during this step.
    pub evictions_this_step: usize,
    /// Positions reused from the cache this step (prefix reuse included).
    pub reused_positions: usize,
    /// Positions whose keys and values were computed this step.
    pub computed_positions: usize,
}

impl KvCacheStateTrace {
    /// An empty state for `step` with a capacity of `max_positions`.
    pub fn new(step: usize, max_positions: usize) -> Self {
        Self {
            step,
            max_positions,
            ..Self::default()
        }
    }

    /// Share of the capacity in use, in `[0, 1]` (0 for a zero capacity).
    pub fn utilization(&self) -> f32 {
        if self.max_positions == 0 {
            0.0
        } else {
            (self.valid_positions as f32 / self.max_positions as f32).min(1.0)
        }
    }

    /// The cache is at capacity: the next new position evicts.
    pub fn is_full(&self) -> bool {
        self.max_positions > 0 && self.valid_positions >= self.max_positions
    }
}

/// KV cache behaviour over a session: totals over every step, and the
/// most recent steps in detail.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KvCacheSessionTrace {
    /// The most recent steps, oldest first (at most `max_retained_steps`).
    pub steps: VecDeque<KvCacheStateTrace>,
    /// Steps kept in `steps`.
    pub max_retained_steps: usize,
    /// Steps added over the whole session.
    pub total_steps: usize,
    /// Evictions over the whole session.
    pub total_evictions: usize,
    /// Largest `cache_size_bytes` seen.
    pub peak_memory_bytes: usize,
    /// Largest utilization seen.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub peak_utilization: f32,
    /// Mean `cache_hit_rate` over every step.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_float"))]
    pub avg_hit_rate: f32,
    /// Positions reused over the session.
    pub total_reused: usize,
    /// Positions computed over the session.
    pub total_computed: usize,
}

impl Default for KvCacheSessionTrace {
    fn default() -> Self {
        Self::with_retention(DEFAULT_RETAINED_STEPS)
    }
}

impl KvCacheSessionTrace {
    /// An empty session keeping the last `max_retained_steps` steps (at
    /// least 1). Their room is reserved now, so adding steps never allocates.
    pub fn with_retention(max_retained_steps: usize) -> Self {
        let max_retained_steps = max_retained_steps.max(1);
        Self {
            steps: VecDeque::with_capacity(max_retained_steps),
            max_retained_steps,
            total_steps: 0,
            total_evictions: 0,
            peak_memory_bytes: 0,
            peak_utilization: 0.0,
            avg_hit_rate: 0.0,
            total_reused: 0,
            total_computed: 0,
        }
    }

    /// Folds a step into the totals and keeps it among the recent steps.
    /// The totals saturate at `usize::MAX` (a step read back from a trace
    /// may hold any count).
    pub fn add_step(&mut self, trace: KvCacheStateTrace) {
        self.total_steps += 1;
        self.total_evictions = self
            .total_evictions
            .saturating_add(trace.evictions_this_step);
        self.peak_memory_bytes = self.peak_memory_bytes.max(trace.cache_size_bytes);
        self.peak_utilization = self.peak_utilization.max(trace.utilization());
        let hit = if trace.cache_hit_rate.is_finite() {
            trace.cache_hit_rate
        } else {
            0.0
        };
        self.avg_hit_rate += (hit - self.avg_hit_rate) / self.total_steps as f32;
        self.total_reused = self.total_reused.saturating_add(trace.reused_positions);
        self.total_computed = self.total_computed.saturating_add(trace.computed_positions);
        if self.steps.len() == self.max_retained_steps {
            self.steps.pop_front();
        }
        self.steps.push_back(trace);
    }

    /// Evictions per step over the last `window` retained steps (all of them
    /// when fewer); 0 when there are none.
    pub fn eviction_rate(&self, window: usize) -> f32 {
        let n = window.min(self.steps.len());
        if n == 0 {
            return 0.0;
        }
        let ev: f64 = self
            .steps
            .iter()
            .rev()
            .take(n)
            .map(|s| s.evictions_this_step as f64)
            .sum();
        (ev / n as f64) as f32
    }

    /// Context thrashing: over the last `window` steps the cache evicted more
    /// than `threshold` positions per step on average.
    pub fn has_thrashing(&self, window: usize, threshold: f32) -> bool {
        self.eviction_rate(window) > threshold
    }

    /// The most recent step.
    pub fn last(&self) -> Option<&KvCacheStateTrace> {
        self.steps.back()
    }

    /// Forgets every step and total.
    pub fn clear(&mut self) {
        *self = Self::with_retention(self.max_retained_steps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_session() -> KvCacheSessionTrace {
        let mut session = KvCacheSessionTrace::default();
        for step in 0..100 {
            let mut trace = KvCacheStateTrace::new(step, 2048);
            trace.valid_positions = step + 1;
            trace.cache_size_bytes = (step + 1) * 4096;
            trace.cache_hit_rate = 0.95;
            trace.evictions_this_step = if step > 90 { 1 } else { 0 };
            session.add_step(trace);
        }
        session
    }

    #[test]
    fn test_f260_kv_session_totals() {
        let s = seed_session();
        assert_eq!(s.total_evictions, 9);
        assert_eq!(s.peak_memory_bytes / 1024, 400);
        assert!((s.avg_hit_rate - 0.95).abs() < 1e-5);
        assert!(!s.has_thrashing(50, 0.5));
        assert!(s.has_thrashing(5, 0.5));
        assert!((s.eviction_rate(10) - 0.9).abs() < 1e-6);
        assert!((s.peak_utilization - 100.0 / 2048.0).abs() < 1e-6);
    }

    #[test]
    fn retention_is_bounded_but_totals_are_not() {
        let mut s = KvCacheSessionTrace::with_retention(8);
        for step in 0..1000 {
            let mut t = KvCacheStateTrace::new(step, 16);
            t.evictions_this_step = 1;
            s.add_step(t);
        }
        assert_eq!(s.steps.len(), 8);
        assert_eq!(s.total_steps, 1000);
        assert_eq!(s.total_evictions, 1000);
        assert_eq!(s.last().unwrap().step, 999);
    }

    #[test]
    fn utilization_edges() {
        let mut t = KvCacheStateTrace::new(0, 0);
        assert_eq!(t.utilization(), 0.0);
        assert!(!t.is_full());
        t.max_positions = 4;
        t.valid_positions = 4;
        assert_eq!(t.utilization(), 1.0);
        assert!(t.is_full());
        assert_eq!(KvCacheSessionTrace::default().eviction_rate(10), 0.0);
    }
}
