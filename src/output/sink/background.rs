//! A sink on a thread of its own: the forward is copied on the model's
//! thread, and whatever the inner sink does with it (formatting floats,
//! writing a file) happens beside the model instead of inside its step.

use std::fmt;
use std::io;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use super::ForwardSink;
use crate::forward::ForwardTrace;

/// What the model's thread hands to the sink's.
enum Job {
    Forward(Box<ForwardTrace>),
    Config(String),
    Flush(SyncSender<()>),
    Close,
}

/// What the two threads share: the inner sink's first failure (the
/// position of the forward it could not write, the error's kind and
/// message), and whether the sink's thread ended because the sink was
/// dropped.
#[derive(Debug, Default)]
struct State {
    failure: Option<(usize, io::ErrorKind, String)>,
    closed: bool,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn failed(state: &Mutex<State>) -> io::Result<()> {
    match &lock(state).failure {
        None => Ok(()),
        Some((position, kind, message)) => Err(io::Error::new(
            *kind,
            format!("the forward at position {position} was not written: {message}"),
        )),
    }
}

/// Runs a [`ForwardSink`] on a thread of its own.
///
/// [`write_forward`](ForwardSink::write_forward) copies the forward and
/// queues it; the thread hands the copies to the inner sink in the order
/// they came, so the inner sink sees exactly what it would have seen on
/// the model's thread. The queue holds at most `depth` forwards: a model
/// that outruns its sink waits for it (memory stays bounded) rather than
/// dropping records.
///
/// A failure of the inner sink is reported by the next `write_forward`
/// (or [`flush`](Self::flush)) with the position of the forward that was
/// not written; the inner sink receives nothing after it. So the
/// [`SinkStatus`](super::SinkStatus) of the tracer holding this sink
/// counts the forwards queued, and names the position at which the
/// failure was noticed.
///
/// Dropping the sink writes what is queued and joins the thread.
///
/// ```
/// # #[cfg(feature = "serde")] {
/// use model_tracer::sink::BackgroundSink;
/// use model_tracer::{JsonlSink, Lightweight, ModelTracer, SinkHandle, Stage};
/// use std::sync::{Arc, Mutex};
///
/// #[derive(Clone, Default)]
/// struct Shared(Arc<Mutex<Vec<u8>>>);
/// impl std::io::Write for Shared {
///     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
///         self.0.lock().unwrap().extend_from_slice(b);
///         Ok(b.len())
///     }
///     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
/// }
///
/// let out = Shared::default();
/// let sink = BackgroundSink::new(JsonlSink::new(out.clone()), 64).unwrap();
/// let flush = sink.flusher();
/// let mut tracer = ModelTracer::new(Lightweight);
/// tracer.set_sink(Some(SinkHandle::new(sink)));
/// for pos in 0..3 {
///     tracer.begin_forward(pos);
///     tracer.activation(0, Stage::Input, &[1.0, 2.0, 3.0]);
///     tracer.end_forward();
/// }
/// flush.flush().unwrap(); // the three rows are written now
/// let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
/// assert_eq!(text.lines().count(), 3);
/// # }
/// ```
pub struct BackgroundSink {
    queue: SyncSender<Job>,
    state: Arc<Mutex<State>>,
    worker: Option<JoinHandle<()>>,
}

impl fmt::Debug for BackgroundSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackgroundSink")
            .field("state", &*lock(&self.state))
            .finish_non_exhaustive()
    }
}

impl BackgroundSink {
    /// Starts the thread that runs `sink`, with room for `depth` forwards
    /// in flight (at least one). Fails only if the thread cannot be
    /// spawned.
    pub fn new(sink: impl ForwardSink + 'static, depth: usize) -> io::Result<Self> {
        let (queue, jobs) = mpsc::sync_channel(depth.max(1));
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let worker = thread::Builder::new()
            .name("trace-sink".into())
            .spawn(move || {
                drain(sink, &jobs, &shared);
                // Not reached when the inner sink panics.
                lock(&shared).closed = true;
            })?;
        Ok(Self {
            queue,
            state,
            worker: Some(worker),
        })
    }

    /// A handle that waits for this sink, clonable and usable from any
    /// thread once the sink itself has moved into a tracer.
    pub fn flusher(&self) -> BackgroundFlush {
        BackgroundFlush {
            queue: self.queue.clone(),
            state: Arc::clone(&self.state),
        }
    }

    /// Waits until every forward queued so far has reached the inner sink;
    /// the inner sink's failure, if any.
    pub fn flush(&self) -> io::Result<()> {
        self.flusher().flush()
    }
}

fn drain(mut sink: impl ForwardSink, jobs: &Receiver<Job>, state: &Mutex<State>) {
    for job in jobs {
        match job {
            Job::Forward(forward) => {
                if lock(state).failure.is_some() {
                    continue;
                }
                if let Err(e) = sink.write_forward(&forward) {
                    lock(state).failure = Some((forward.position, e.kind(), e.to_string()));
                }
            }
            Job::Config(description) => sink.tracer_config(&description),
            Job::Flush(done) => {
                // The waiter may have given up; nothing to tell then.
                let _ = done.send(());
            }
            Job::Close => return,
        }
    }
}

fn stopped() -> io::Error {
    io::Error::other("the sink's thread has stopped")
}

impl ForwardSink for BackgroundSink {
    fn write_forward(&mut self, forward: &ForwardTrace) -> io::Result<()> {
        failed(&self.state)?;
        self.queue
            .send(Job::Forward(Box::new(forward.clone())))
            .map_err(|_| stopped())
    }

    fn tracer_config(&mut self, description: &str) {
        // A stopped thread has no sink left to tell.
        let _ = self.queue.send(Job::Config(description.to_string()));
    }
}

impl Drop for BackgroundSink {
    fn drop(&mut self) {
        // Close goes behind every queued forward; a thread that has
        // stopped already (its sink panicked) has nothing left to write.
        let _ = self.queue.send(Job::Close);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Waits for a [`BackgroundSink`]: see [`BackgroundSink::flusher`].
#[derive(Clone)]
pub struct BackgroundFlush {
    queue: SyncSender<Job>,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for BackgroundFlush {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackgroundFlush").finish_non_exhaustive()
    }
}

impl BackgroundFlush {
    /// Waits until every forward queued so far has reached the inner sink;
    /// the inner sink's failure, if any. Once the sink is dropped
    /// everything has been written, and this returns at once; a thread
    /// that stopped because its sink panicked is an error.
    pub fn flush(&self) -> io::Result<()> {
        let (done, wait) = mpsc::sync_channel(1);
        let reached = self.queue.send(Job::Flush(done)).is_ok() && wait.recv().is_ok();
        failed(&self.state)?;
        if reached || lock(&self.state).closed {
            Ok(())
        } else {
            Err(stopped())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::{Lightweight, ModelTracer, SinkHandle, Stage};

    /// Remembers the positions it was given, after a pause each; fails
    /// at `fail_at`, panics at `panic_at`.
    struct Probe {
        seen: Arc<Mutex<Vec<usize>>>,
        configs: Arc<AtomicUsize>,
        pause: Duration,
        fail_at: Option<usize>,
        panic_at: Option<usize>,
    }

    impl Probe {
        fn new() -> (Self, Arc<Mutex<Vec<usize>>>) {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let probe = Self {
                seen: Arc::clone(&seen),
                configs: Arc::new(AtomicUsize::new(0)),
                pause: Duration::ZERO,
                fail_at: None,
                panic_at: None,
            };
            (probe, seen)
        }
    }

    impl ForwardSink for Probe {
        fn write_forward(&mut self, forward: &ForwardTrace) -> io::Result<()> {
            thread::sleep(self.pause);
            if self.panic_at == Some(forward.position) {
                panic!("the probe panics at position {}", forward.position);
            }
            if self.fail_at == Some(forward.position) {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "disk full"));
            }
            lock_seen(&self.seen).push(forward.position);
            Ok(())
        }

        fn tracer_config(&mut self, _description: &str) {
            self.configs.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn lock_seen(seen: &Mutex<Vec<usize>>) -> MutexGuard<'_, Vec<usize>> {
        seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn forward(position: usize) -> ForwardTrace {
        ForwardTrace {
            position,
            ..ForwardTrace::default()
        }
    }

    #[test]
    fn forwards_reach_the_inner_sink_in_order_through_a_full_queue() {
        let (mut probe, seen) = Probe::new();
        probe.pause = Duration::from_micros(200);
        let configs = Arc::clone(&probe.configs);
        let mut sink = BackgroundSink::new(probe, 2).unwrap();
        sink.tracer_config("lightweight");
        for p in 0..50 {
            sink.write_forward(&forward(p)).unwrap();
        }
        sink.flush().unwrap();
        assert_eq!(*lock_seen(&seen), (0..50).collect::<Vec<_>>());
        assert_eq!(configs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn dropping_the_sink_writes_what_was_queued() {
        let (mut probe, seen) = Probe::new();
        probe.pause = Duration::from_millis(1);
        let mut sink = BackgroundSink::new(probe, 64).unwrap();
        let flush = sink.flusher();
        for p in 0..20 {
            sink.write_forward(&forward(p)).unwrap();
        }
        drop(sink);
        assert_eq!(lock_seen(&seen).len(), 20);
        // Nothing is left to wait for.
        flush.flush().unwrap();
    }

    #[test]
    fn a_failure_is_reported_with_its_position_and_stops_the_inner_sink() {
        let (mut probe, seen) = Probe::new();
        probe.fail_at = Some(3);
        let mut sink = BackgroundSink::new(probe, 8).unwrap();
        for p in 0..6 {
            // Queued before the thread reached position 3, or refused.
            let _ = sink.write_forward(&forward(p));
        }
        let err = sink.flush().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
        assert!(err.to_string().contains("position 3"), "{err}");
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(sink.write_forward(&forward(6)).is_err());
        assert_eq!(*lock_seen(&seen), vec![0, 1, 2]);
    }

    #[test]
    fn a_panicking_inner_sink_is_an_error_not_a_hang() {
        let (mut probe, seen) = Probe::new();
        probe.panic_at = Some(1);
        let mut sink = BackgroundSink::new(probe, 1).unwrap();
        let mut refused = false;
        for p in 0..10 {
            refused |= sink.write_forward(&forward(p)).is_err();
        }
        let flush = sink.flusher();
        assert!(flush.flush().is_err());
        assert!(refused || sink.write_forward(&forward(10)).is_err());
        assert_eq!(*lock_seen(&seen), vec![0]);
        drop(sink);
        assert!(flush.flush().is_err());
    }

    #[test]
    fn a_tracer_writes_through_it_what_it_writes_directly() {
        let run = |handle: SinkHandle| {
            let mut tracer = ModelTracer::new(Lightweight);
            tracer.set_sink(Some(handle));
            for pos in 0..12 {
                tracer.begin_forward(pos);
                let x: Vec<f32> = (0..64).map(|i| (i * (pos + 1)) as f32 * 0.25).collect();
                tracer.activation(0, Stage::Input, &x);
                tracer.activation(1, Stage::Output, &x);
                tracer.end_forward();
            }
            tracer.sink().map(|s| s.status().forwards_written)
        };
        let (direct, seen_direct) = Probe::new();
        let (queued, seen_queued) = Probe::new();
        assert_eq!(run(SinkHandle::new(direct)), Some(12));
        let background = BackgroundSink::new(queued, 4).unwrap();
        let flush = background.flusher();
        assert_eq!(run(SinkHandle::new(background)), Some(12));
        flush.flush().unwrap();
        assert_eq!(*lock_seen(&seen_queued), *lock_seen(&seen_direct));
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_lines_through_it_are_byte_for_byte_the_direct_ones() {
        use crate::JsonlSink;

        #[derive(Clone, Default)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let trace = |sink: Box<dyn FnOnce(Shared) -> SinkHandle>| {
            let out = Shared::default();
            let mut tracer = ModelTracer::new(Lightweight);
            tracer.set_sink(Some(sink(out.clone())));
            for pos in 0..8 {
                tracer.begin_forward(pos);
                let mut x: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 7.0).collect();
                if pos == 5 {
                    x[3] = f32::NAN;
                }
                tracer.activation(2, Stage::PostNorm, &x);
                tracer.end_forward();
            }
            drop(tracer);
            let bytes = out.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
            bytes
        };
        let direct = trace(Box::new(|o| SinkHandle::new(JsonlSink::new(o))));
        let queued = trace(Box::new(|o| {
            SinkHandle::new(BackgroundSink::new(JsonlSink::new(o), 3).unwrap())
        }));
        assert_eq!(direct.iter().filter(|&&b| b == b'\n').count(), 8);
        assert_eq!(queued, direct);
    }
}
