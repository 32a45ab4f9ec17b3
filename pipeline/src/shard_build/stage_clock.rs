//! Time spent per stage of pass 2, summed over threads, for [`super::BuildTimes`].
//!
//! The stages are timed in the *calling thread's CPU time*, not wall time: on one core the
//! writer thread and the rendering workers preempt each other, and a wall clock around a stage
//! would also count the other threads' work done meanwhile. The disk wait (the final fsync of a
//! shard) is the one wall-clock figure, since waiting is what it measures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Default)]
pub struct StageClocks {
    /// Reading spilled samples, decoding and tiling images (worker threads).
    pub render: CpuClock,
    /// Tile encoding (worker threads).
    pub encode: CpuClock,
    /// Arrow batches, Parquet encoding, SHA-256, file writes (the writer thread).
    pub write: CpuClock,
    /// Waiting for a finished shard to reach the disk (wall time).
    pub sync: WallClock,
}

/// Accumulated CPU time of whichever threads call [`CpuClock::stop`].
#[derive(Default)]
pub struct CpuClock(AtomicU64);

/// A started CPU-time measurement of the calling thread.
pub struct CpuStart(u64);

impl CpuClock {
    pub fn start() -> CpuStart {
        CpuStart(thread_cpu_ns())
    }

    /// Adds the calling thread's CPU time since `start` (taken on this same thread).
    pub fn stop(&self, start: CpuStart) {
        self.0
            .fetch_add(thread_cpu_ns().saturating_sub(start.0), Ordering::Relaxed);
    }

    pub fn seconds(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

#[derive(Default)]
pub struct WallClock(AtomicU64);

impl WallClock {
    pub fn add(&self, since: Instant) {
        let ns = since.elapsed().as_nanos() as u64;
        self.0.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn seconds(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

/// The calling thread's CPU time in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`; 0 if unavailable,
/// which only makes the breakdown read zero).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given, which lives on this stack.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_clock_counts_work_not_sleep() {
        let clock = CpuClock::default();
        let start = CpuClock::start();
        std::thread::sleep(std::time::Duration::from_millis(50));
        clock.stop(start);
        // Sleeping costs (almost) no CPU time; a wall clock would read >= 0.05 s.
        assert!(clock.seconds() < 0.02, "{}", clock.seconds());
        let start = CpuClock::start();
        let begin = thread_cpu_ns();
        let mut x = 0u64;
        while thread_cpu_ns() < begin + 5_000_000 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        clock.stop(start);
        assert!(clock.seconds() >= 0.005, "{}", clock.seconds());
    }
}
