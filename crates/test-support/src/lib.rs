//! Helpers shared by the tests and benchmarks of every crate in the
//! workspace: the counting allocator, the seeded generator of test data
//! ([`SplitMix64`]), a GGUF writer for test files ([`gguf::GgufWriter`]),
//! the real model's path and the CI-or-skip rule. Not part of any crate's
//! API: it depends on nothing, so that the tracer's own unit tests can use
//! it too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicIsize, Ordering};

mod bump;
pub mod gguf;
pub mod modules;
mod rng;

pub use bump::BumpAllocator;
pub use rng::SplitMix64;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// Live heap bytes of the whole process: allocated minus freed.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting the allocations and reallocations of the
/// calling thread and the largest size it asked for
/// ([`largest_allocation`]), and the live heap bytes of the whole process. A test
/// binary installs it with
/// `#[global_allocator] static A: CountingAllocator = CountingAllocator;`;
/// allocation counts are per thread because the test harness runs tests on
/// parallel threads.
pub struct CountingAllocator;

/// Counts one allocation of `size` bytes, before it is attempted.
fn count_one(size: usize) {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is a thread-local `Cell` that never allocates (`const` init) and
// is skipped once the thread-local is gone, and the byte count an atomic.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one(layout.size());
        // SAFETY: the caller's contract is System's contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one(layout.size());
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one(new_size);
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

/// Allocations the calling thread has made so far (through
/// [`CountingAllocator`], when it is the global allocator).
pub fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

/// Runs `f` and returns its result with the allocations it made on this
/// thread.
pub fn count_allocations<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = allocations();
    let r = f();
    (r, allocations() - before)
}

/// Runs `f` and returns its result with the size in bytes of the largest
/// allocation or reallocation it asked for on this thread (through
/// [`CountingAllocator`], when it is the global allocator), whether or not
/// the system could serve it: a parser that sized a buffer by a count read
/// from its input shows here before it fails.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let outer = LARGEST.with(|c| c.replace(0));
    let r = f();
    let largest = LARGEST.with(|c| c.replace(outer.max(c.get())));
    (r, largest)
}

/// Heap bytes the whole process holds (through [`CountingAllocator`], when
/// it is the global allocator): every thread's, so a test that reads it
/// must not run beside others that allocate.
pub fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// The workspace's top directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The real model file: `MODEL_TRACER_GGUF`, else `models/...` at the top
/// of the workspace, where `bash .ci/fetch-model` puts it.
pub fn model_path() -> PathBuf {
    std::env::var_os("MODEL_TRACER_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root()
                .join("models")
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

/// The real model file when it is present; otherwise a loud skip, or a
/// failure in CI (`.ci/run` fetches the file).
pub fn real_model() -> Option<PathBuf> {
    let path = model_path();
    let what = format!(
        "the real model file at {} (`bash .ci/fetch-model`, or set MODEL_TRACER_GGUF)",
        path.display()
    );
    require(path.exists(), &what).then_some(path)
}

/// Whether the tests run in CI (`.ci/run` sets `CI=true`): a missing tool
/// is then a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skips (returns `false`) with a loud message, or fails in CI.
pub fn require(available: bool, what: &str) -> bool {
    if !available {
        assert!(
            !in_ci(),
            "{what} is required in CI (.ci/run installs it) but is missing"
        );
        eprintln!("SKIPPED: {what} is not available");
    }
    available
}

/// A fresh directory under `base` (a test's `env!("CARGO_TARGET_TMPDIR")`)
/// for one test's files.
pub fn scratch_dir(base: &str, name: &str) -> PathBuf {
    let dir = Path::new(base).join(format!(
        "{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("creating {}: {e}", dir.display());
    }
    dir
}

/// The python interpreter, if `python3` runs and can import `module`.
pub fn python_with(module: &str) -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some("python3")
}

/// Headless Chromium: `MODEL_TRACER_CHROMIUM`, else the first of the usual
/// names on `PATH`.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MODEL_TRACER_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in [
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        ] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Runs Chromium headless on `page` with `extra` flags and a fresh profile
/// under `dir`, with no network and no background services, killing it
/// after two minutes; returns its standard output.
pub fn run_chromium(bin: &Path, dir: &Path, page: &Path, extra: &[String]) -> String {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let profile = dir.join(format!("profile-{}", extra.len()));
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(format!("file://{}", page.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("starting {}: {e}", bin.display()),
    };
    let Some(mut stdout) = child.stdout.take() else {
        panic!("chromium has no standard output");
    };
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => panic!("waiting for chromium: {e}"),
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish in 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match reader.join() {
        Ok(Ok(s)) => s,
        other => panic!("reading chromium's output: {other:?}"),
    }
}
