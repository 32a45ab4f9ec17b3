//! The prefetching loader: N worker threads read, decode, normalise and collate the planned
//! batches of one rank; the consumer gets them strictly in plan order.
//!
//! Work is claimed in plan order from a shared counter (a lazy plan makes each batch as it is
//! claimed, so the loader never holds the epoch's batches), and a worker may only claim batch `i`
//! while `i < consumed + prefetch`, so at most `prefetch` batches exist at once (being built or
//! waiting in the reorder buffer): memory is bounded by the prefetch depth. The batch the
//! consumer waits for is always claimed before any later one, so the buffer cannot deadlock.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::collate::{collate, without_samples, Batch, PixelFormat};
use super::error::{DataError, DataResult};
use super::index::ShardIndex;
use super::plan::PlannedBatch;
use super::read::ShardReader;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Worker threads (default 16).
    pub workers: usize,
    /// Batches built or buffered at once; at least `workers` keeps every worker busy.
    pub prefetch: usize,
    pub pixels: PixelFormat,
    /// What a row whose checksum does not match does: fail the batch (default) or be left out.
    pub on_corrupt: OnCorrupt,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            workers: 16,
            prefetch: 16,
            pixels: PixelFormat::F32,
            on_corrupt: OnCorrupt::Stop,
        }
    }
}

/// What the loader does with a row whose stored checksum does not match its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCorrupt {
    /// The batch fails with [`DataError::RowChecksum`] naming the shard, row group, row and sample.
    #[default]
    Stop,
    /// The sample is left out of its batch and listed in [`Batch::skipped`].
    Skip,
}

impl std::str::FromStr for OnCorrupt {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop" => Ok(Self::Stop),
            "skip" => Ok(Self::Skip),
            _ => Err(format!("{s:?}: use stop or skip")),
        }
    }
}

struct Queue {
    next_job: usize,
    consumed: usize,
    stopped: bool,
    /// The plan, made one batch at a time as workers claim them (in plan order, under the lock).
    jobs: Box<dyn Iterator<Item = PlannedBatch> + Send>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    prefetch: usize,
    /// Batches in the plan.
    len: usize,
}

impl Shared {
    /// The next job this worker may build, or None when done or stopped.
    fn claim(&self) -> Option<(usize, PlannedBatch)> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if q.stopped || q.next_job >= self.len {
                return None;
            }
            if q.next_job < q.consumed + self.prefetch {
                let job = q.jobs.next()?;
                q.next_job += 1;
                return Some((q.next_job - 1, job));
            }
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn stop(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).stopped = true;
        self.wake.notify_all();
    }
}

/// Iterator over one rank's batches in plan order. Yields `Err` once on the first failure (with
/// the shard file and row group named) and then ends. Dropping it stops the workers.
pub struct Loader {
    shared: Arc<Shared>,
    results: Receiver<(usize, DataResult<Batch>)>,
    workers: Vec<JoinHandle<()>>,
    reorder: BTreeMap<usize, DataResult<Batch>>,
    next: usize,
    done: bool,
}

impl Loader {
    /// Loads `plan`'s batches: a `Vec`, or a rank's lazy plan
    /// ([`EpochPlan::rank_batches`](super::EpochPlan::rank_batches)), whose batches are made as
    /// the workers claim them.
    pub fn new<P>(index: Arc<ShardIndex>, plan: P, config: &LoaderConfig) -> DataResult<Self>
    where
        P: IntoIterator<Item = PlannedBatch>,
        P::IntoIter: ExactSizeIterator + Send + 'static,
    {
        if config.workers == 0 || config.prefetch == 0 {
            return Err(DataError::Plan(
                "loader needs at least one worker and a prefetch depth of at least 1".into(),
            ));
        }
        let jobs = plan.into_iter();
        let shared = Arc::new(Shared {
            len: jobs.len(),
            queue: Mutex::new(Queue {
                next_job: 0,
                consumed: 0,
                stopped: false,
                jobs: Box::new(jobs),
            }),
            wake: Condvar::new(),
            prefetch: config.prefetch,
        });
        let (tx, rx) = channel();
        let mut workers = Vec::with_capacity(config.workers);
        for w in 0..config.workers.min(shared.len.max(1)) {
            let shared = shared.clone();
            let tx = tx.clone();
            let index = index.clone();
            let (pixels, on_corrupt) = (config.pixels, config.on_corrupt);
            let handle = std::thread::Builder::new()
                .name(format!("loader-{w}"))
                .spawn(move || worker(shared, index, pixels, on_corrupt, tx))
                .map_err(|e| DataError::Worker(format!("cannot spawn a thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Self {
            shared,
            results: rx,
            workers,
            reorder: BTreeMap::new(),
            next: 0,
            done: false,
        })
    }

    /// Batches this loader delivers in total.
    pub fn len(&self) -> usize {
        self.shared.len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }
}

fn worker(
    shared: Arc<Shared>,
    index: Arc<ShardIndex>,
    pixels: PixelFormat,
    on_corrupt: OnCorrupt,
    tx: Sender<(usize, DataResult<Batch>)>,
) {
    let mut reader = ShardReader::new(index.clone());
    let tile_size = index.tile_size();
    while let Some((i, job)) = shared.claim() {
        let plan = &job;
        let start = Instant::now();
        // A panic in decoding must reach the consumer as an error, not hang it.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let read = reader.read(plan, on_corrupt)?;
            let mut batch = if read.skipped.is_empty() {
                collate(plan, &read.rows, pixels, tile_size)
            } else {
                let positions: Vec<usize> = read.skipped.iter().map(|(p, _)| *p).collect();
                let kept = without_samples(plan, &positions);
                let mut b = collate(&kept, &read.rows, pixels, tile_size);
                b.skipped = read.skipped.into_iter().map(|(_, c)| c).collect();
                b
            };
            batch.bytes_read = read.bytes;
            Ok(batch)
        }))
        .unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(DataError::Worker(format!(
                "panic while loading step {}: {msg}",
                plan.step
            )))
        })
        .map(|mut b: Batch| {
            b.load_time = start.elapsed();
            b
        });
        if tx.send((i, result)).is_err() {
            return; // consumer gone
        }
    }
}

impl Iterator for Loader {
    type Item = DataResult<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next >= self.shared.len {
            return None;
        }
        let result = loop {
            if let Some(r) = self.reorder.remove(&self.next) {
                break r;
            }
            match self.results.recv() {
                Ok((i, r)) => {
                    self.reorder.insert(i, r);
                }
                Err(_) => {
                    break Err(DataError::Worker(
                        "all loader workers exited before the batch was ready".into(),
                    ))
                }
            }
        };
        self.next += 1;
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.consumed = self.next;
        }
        self.shared.wake.notify_all();
        if result.is_err() {
            self.done = true;
            self.shared.stop();
        }
        Some(result)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.stop();
        // Workers finish their current batch, fail to send or see `stopped`, and exit.
        self.reorder.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
