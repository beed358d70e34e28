//! The traces of the most recent requests, by request id: each request's
//! JSON Lines rows (one per position it ran, so at most its prompt plus
//! `max_tokens` rows), kept for the last `keep` requests, and the HTML
//! report rendered from them on demand.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use model_tracer::replay::ReplayedTrace;

/// One request's trace.
#[derive(Debug)]
pub struct StoredTrace {
    /// Its JSON Lines rows.
    pub rows: Vec<u8>,
}

impl StoredTrace {
    /// The HTML report of the rows, named `name`: the page `run --html`
    /// and `model-tracer report` write.
    pub fn report(&self, name: &str) -> Result<Vec<u8>, String> {
        let replay = ReplayedTrace::read_jsonl(self.rows.as_slice(), self.rows.len().max(1))
            .map_err(|e| e.to_string())?;
        let input = replay.report_input(name);
        let mut out = Vec::new();
        model_tracer::write_html(&mut out, &input).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// The last `keep` requests' traces.
#[derive(Debug)]
pub struct TraceStore {
    keep: usize,
    order: VecDeque<String>,
    traces: HashMap<String, Arc<StoredTrace>>,
}

impl TraceStore {
    /// A store of at most `keep` traces.
    pub fn new(keep: usize) -> Self {
        Self {
            keep,
            order: VecDeque::new(),
            traces: HashMap::new(),
        }
    }

    /// Keeps `trace` as request `id`'s, forgetting the oldest beyond
    /// `keep`.
    pub fn insert(&mut self, id: String, trace: StoredTrace) {
        if self.keep == 0 {
            return;
        }
        if self.traces.insert(id.clone(), Arc::new(trace)).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.keep {
            if let Some(old) = self.order.pop_front() {
                self.traces.remove(&old);
            }
        }
    }

    /// Request `id`'s trace, while it is kept.
    pub fn get(&self, id: &str) -> Option<Arc<StoredTrace>> {
        self.traces.get(id).cloned()
    }

    /// Traces kept.
    pub fn len(&self) -> usize {
        self.traces.len()
    }

    /// Bytes of the rows kept.
    pub fn bytes(&self) -> usize {
        self.traces.values().map(|t| t.rows.len()).sum()
    }
}

/// The store, shared by the model thread and the HTTP side.
pub type SharedStore = Arc<Mutex<TraceStore>>;

/// Locks the store, even one whose holder panicked.
pub fn lock(store: &SharedStore) -> std::sync::MutexGuard<'_, TraceStore> {
    store
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(rows: &str) -> StoredTrace {
        StoredTrace {
            rows: rows.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_store_keeps_the_most_recent() {
        let mut s = TraceStore::new(2);
        s.insert("a".into(), trace("1"));
        s.insert("b".into(), trace("2"));
        s.insert("c".into(), trace("3"));
        assert!(s.get("a").is_none());
        assert_eq!(s.get("b").map(|t| t.rows.clone()), Some(b"2".to_vec()));
        assert_eq!(s.get("c").map(|t| t.rows.clone()), Some(b"3".to_vec()));
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), 2);
        let mut none = TraceStore::new(0);
        none.insert("a".into(), trace("1"));
        assert!(none.get("a").is_none());
    }

    #[test]
    fn rows_that_do_not_parse_give_an_error_not_a_report() {
        assert!(trace("not json\n").report("m").is_err());
        assert!(trace("").report("m").is_err());
    }
}
