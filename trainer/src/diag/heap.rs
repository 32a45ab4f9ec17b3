//! Live heap bytes, for `bench`'s CPU memory figures: RSS counts pages the allocator keeps after
//! a free (glibc's per-thread arenas), so its peak says little about what the step really held.
//! The `llava-trainer` binary installs [`CountingAlloc`] as its global allocator; a program that
//! does not install it reads [`is_installed`] false and falls back to RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting live bytes and their high-water mark (two relaxed atomics per
/// allocation).
pub struct CountingAlloc;

impl CountingAlloc {
    fn added(size: usize) {
        let live = LIVE.fetch_add(size as u64, Ordering::Relaxed) + size as u64;
        PEAK.fetch_max(live, Ordering::Relaxed);
        INSTALLED.store(true, Ordering::Relaxed);
    }

    fn removed(size: usize) {
        LIVE.fetch_sub(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated around it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        Self::removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Self::removed(layout.size());
            Self::added(new_size);
        }
        p
    }
}

/// Whether the running program counts (it has allocated through [`CountingAlloc`]).
pub fn is_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Bytes allocated and not yet freed.
pub fn live() -> u64 {
    LIVE.load(Ordering::Relaxed)
}

/// Starts a new high-water mark at the current live bytes.
pub fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

/// Highest live bytes since the last [`reset_peak`].
pub fn peak() -> u64 {
    PEAK.load(Ordering::Relaxed)
}

/// Peak live bytes per phase of a training run (`step`, `checkpoint`), for checking the memory
/// plan on CPU ranks: the run marks its phases with [`enter`]; with `LLAVA_HEAP_REPORT=<dir>`
/// set, [`RunReport`] writes `<dir>/heap-rank<r>.json` when the run ends.
struct Phases {
    current: Option<&'static str>,
    peaks: std::collections::BTreeMap<&'static str, u64>,
}

static PHASES: std::sync::Mutex<Phases> = std::sync::Mutex::new(Phases {
    current: None,
    peaks: std::collections::BTreeMap::new(),
});

/// Ends the current phase (its peak is kept, the highest over its repetitions) and starts
/// `name` from the bytes live now.
pub fn enter(name: &'static str) {
    let mut p = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    close(&mut p);
    p.current = Some(name);
    reset_peak();
}

fn close(p: &mut Phases) {
    if let Some(cur) = p.current.take() {
        let peak = peak();
        let e = p.peaks.entry(cur).or_insert(0);
        *e = (*e).max(peak);
    }
}

/// The phases' peaks of one rank's run; written on drop when `LLAVA_HEAP_REPORT` names a folder.
pub struct RunReport {
    rank: usize,
    world: usize,
    /// Live bytes when the run started (the process's own, before the model).
    baseline: u64,
}

impl RunReport {
    pub fn start(rank: usize, world: usize) -> Self {
        Self {
            rank,
            world,
            baseline: live(),
        }
    }
}

impl Drop for RunReport {
    fn drop(&mut self) {
        let Some(dir) = std::env::var_os("LLAVA_HEAP_REPORT") else {
            return;
        };
        if !is_installed() {
            return;
        }
        let mut p = PHASES.lock().unwrap_or_else(|e| e.into_inner());
        close(&mut p);
        let peaks: serde_json::Map<String, serde_json::Value> = p
            .peaks
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        let doc = serde_json::json!({
            "rank": self.rank,
            "world": self.world,
            "baseline": self.baseline,
            "peaks": peaks,
        });
        let path = std::path::Path::new(&dir).join(format!("heap-rank{}.json", self.rank));
        if let Err(e) = std::fs::write(&path, doc.to_string()) {
            tracing::warn!("{}: cannot write the heap report: {e}", path.display());
        }
    }
}
