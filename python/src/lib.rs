//! `llava_data`: llava-data shards from Python, through the trainer's loader crate, `llava-loader`.
//!
//! [`ShardDataset`] wraps `llava_loader` as it is: the shard index, the token-balanced
//! resumable epoch plan ([`EpochPlan`] / [`DataState`]), the prefetching worker threads
//! ([`Loader`]) and the collation. Only the hand-over is new: each collated batch becomes the
//! dict the reference's `DataCollatorForSupervisedDataset` gives its model, as NumPy arrays
//! (the pixels without a copy).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use llava_loader::{
    Batch, DataError, DataState, EpochPlan, IndexOptions, Loader, LoaderConfig, OnCorrupt,
    PixelFormat, Pixels, PlanConfig, ShardIndex, PAD_ID,
};
use numpy::{PyArray, PyArray1, PyArrayMethods};
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyError, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySlice, PyTuple};

/// The reference's label for positions without loss.
const IGNORE_INDEX: i64 = -100;

/// A Rust error as the Python exception a caller would expect, with the Rust error's text.
fn py_err(e: DataError) -> PyErr {
    let msg = e.to_string();
    match &e {
        DataError::Io { source, .. } | DataError::MissingShard { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            PyFileNotFoundError::new_err(msg)
        }
        DataError::Io { .. } | DataError::MissingShard { .. } => PyOSError::new_err(msg),
        DataError::BatchSize { .. } | DataError::Plan(_) | DataError::Resume(_) => {
            PyValueError::new_err(msg)
        }
        _ => PyRuntimeError::new_err(msg),
    }
}

/// The batches of one rank of a llava-data shard folder, epoch by epoch: the same plan, order
/// and bytes as `llava-trainer` (token-balanced across ranks, resumable mid-epoch).
///
/// - dir: folder with manifest.json and shards/ (the output of `llava-data build`).
/// - rank, world_size: this process's data-parallel rank (e.g. torch.distributed's); every rank
///   gets the same number of batches per epoch.
/// - seed, epoch: the plan's seed and the epoch to start at.
/// - workers: reader threads (decoding, normalising and collating run in Rust, outside the
///   GIL); prefetch: batches built ahead (default: workers).
/// - batch_size: per-device batch size; None = the size the shards were built with (others must
///   divide it or be a multiple of it).
/// - normalize: True gives CLIP-normalised float32 tiles (bit-identical to the reference);
///   False gives the stored uint8 tiles (normalise on the GPU: 4x less host memory).
///
/// Iterating yields one dict per batch, in plan order:
///
/// - input_ids: int64 [B, L], right padded with 0. The pad id 0 is a real token ("!"): padding
///   is defined by each row's length (attention_mask / lengths), never by comparing ids with 0.
/// - labels: int64 [B, L], -100 where there is no loss (prompts, padding).
/// - attention_mask: bool [B, L], True for the first lengths[i] positions of row i.
/// - images: list of arrays [num_tiles, 3, S, S] (float32, or uint8 with normalize=False), one
///   per image in the order of the -200 placeholders (row by row); a sample without images gets
///   the reference's dummy, zeros [1, 3, S, S], so that every sample has an image slot.
/// - image_sizes: list of (width, height) per entry of images (the dummy: (S, S)).
/// - modalities: list of "image" / "text" per entry of images.
/// - ids: list of (source, index, id) per sample; lengths: int64 [B]; tokens: exact model tokens
///   (image tokens expanded) of the batch; rows: the samples of each row (indices into ids);
///   segments: the input_ids length of each of them. These are not model inputs: MODEL_KEYS
///   lists the keys the reference model's forward takes.
///
/// packing=True lays each batch's samples out back to back in rows of at most pack_length
/// model tokens (default: the shards' model_max_length), as `llava-trainer run --packing`; the
/// same samples per step. pack_across_batches=True fills rows across batch boundaries instead,
/// as `llava-trainer run --pack-across-batches` (fewer, fuller rows; an epoch's leftovers are
/// pooled and may mix modalities). Only for a model that keeps the samples of a row apart
/// (attention, positions and loss per segment): the reference model does not.
///
/// An epoch ends with StopIteration; iterating again continues with the next epoch (or call
/// set_epoch). state_dict() is where the next batch comes from: save it with a checkpoint and
/// pass it to load_state_dict() to continue with exactly the remaining batches. len() is the
/// number of batches the next iteration yields.
///
/// Every row's checksum is verified as it is read: a changed row raises RuntimeError naming the
/// shard, row group, row and sample; on_corrupt="skip" leaves such samples out of their batch
/// instead (listed in the batch's "skipped").
///
/// With torch: wrap it in an IterableDataset whose __iter__ iterates the dataset, and give that to
/// DataLoader(..., batch_size=None, num_workers=N). Inside a DataLoader worker process (torch's
/// get_worker_info()) the iteration yields only that worker's share of the batches (the i-th
/// batch of the iteration goes to worker i % N), so the DataLoader, which takes the workers'
/// batches in turn, yields every batch once and in plan order for any N. The dataset object in
/// the main process does not advance then: each batch's "state" is the state_dict() after it
/// (keep the last consumed one to resume). Give each worker few threads (workers=1 or 2).
#[pyclass(module = "llava_data", subclass)]
pub struct ShardDataset {
    /// The constructor's arguments, for pickling (DataLoader workers started with spawn).
    args: Args,
    index: Arc<ShardIndex>,
    plan: PlanConfig,
    rank: usize,
    loader_config: LoaderConfig,
    /// Where the next batch comes from (the state after the last batch handed out).
    state: DataState,
    /// The running epoch's loader; `None` before the first batch and after an end or an error.
    loader: Option<Mutex<Loader>>,
    /// Set when an iteration ended: `__next__` raises StopIteration until `__iter__` restarts.
    exhausted: bool,
    /// Inside a torch DataLoader worker: (worker id, number of workers) of this iteration.
    share: Option<(usize, usize)>,
    /// The process that started `loader`'s threads (a forked child must not join them).
    loader_pid: u32,
    /// The epoch `loader` iterates.
    loader_epoch: u64,
}

/// The constructor's arguments (what `__reduce__` gives back).
#[derive(Clone)]
struct Args {
    dir: PathBuf,
    world_size: usize,
    seed: u64,
    workers: usize,
    batch_size: Option<usize>,
    normalize: bool,
    prefetch: Option<usize>,
    verify_checksums: bool,
    packing: bool,
    pack_length: Option<u32>,
    on_corrupt: String,
    pack_across_batches: bool,
}

/// (worker id, number of workers) when called in a torch DataLoader worker process. Never
/// imports torch: a worker has it imported already.
fn torch_worker(py: Python<'_>) -> PyResult<Option<(usize, usize)>> {
    let modules = py.import("sys")?.getattr("modules")?;
    let Ok(data) = modules.get_item("torch.utils.data") else {
        return Ok(None);
    };
    let info = data.call_method0("get_worker_info")?;
    if info.is_none() {
        return Ok(None);
    }
    let id: usize = info.getattr("id")?.extract()?;
    let n: usize = info.getattr("num_workers")?.extract()?;
    Ok((n > 0 && id < n).then_some((id, n)))
}

impl ShardDataset {
    fn epoch_plan(&self, state: &DataState) -> PyResult<EpochPlan<'_>> {
        EpochPlan::new(&self.index, &self.plan, state).map_err(py_err)
    }

    fn stop(&mut self) {
        // Dropping the loader stops and joins its workers (they never take the GIL). In a forked
        // child (a DataLoader worker) those threads do not exist: forget the loader instead.
        if let Some(loader) = self.loader.take() {
            if self.loader_pid != std::process::id() {
                std::mem::forget(loader);
            }
        }
    }

    /// After the last batch of this worker's share: the state after the epoch's last batch
    /// (the start of the next epoch, as the last batch's state says).
    fn end_of_epoch(&self) -> DataState {
        DataState {
            world_size: self.plan.world_size,
            batch_size: self.state.batch_size,
            seed: self.plan.seed,
            ..DataState::new(self.loader_epoch + 1)
        }
    }
}

#[pymethods]
impl ShardDataset {
    #[new]
    #[pyo3(signature = (dir, rank=0, world_size=1, seed=42, workers=16, epoch=0, batch_size=None,
                        normalize=true, prefetch=None, verify_checksums=false, packing=false,
                        pack_length=None, on_corrupt="stop", pack_across_batches=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        dir: PathBuf,
        rank: usize,
        world_size: usize,
        seed: u64,
        workers: usize,
        epoch: u64,
        batch_size: Option<usize>,
        normalize: bool,
        prefetch: Option<usize>,
        verify_checksums: bool,
        packing: bool,
        pack_length: Option<u32>,
        on_corrupt: &str,
        pack_across_batches: bool,
    ) -> PyResult<Self> {
        let args = Args {
            dir: dir.clone(),
            world_size,
            seed,
            workers,
            batch_size,
            normalize,
            prefetch,
            verify_checksums,
            packing,
            pack_length,
            on_corrupt: on_corrupt.to_string(),
            pack_across_batches,
        };
        let on_corrupt: OnCorrupt = on_corrupt
            .parse()
            .map_err(|e| PyValueError::new_err(format!("on_corrupt: {e}")))?;
        if world_size == 0 || rank >= world_size {
            return Err(PyValueError::new_err(format!(
                "rank {rank} is not below world_size {world_size}"
            )));
        }
        if pack_length.is_some() && !packing && !pack_across_batches {
            return Err(PyValueError::new_err(
                "pack_length is used only with packing=True or pack_across_batches=True",
            ));
        }
        if workers == 0 || prefetch == Some(0) {
            return Err(PyValueError::new_err(
                "workers and prefetch must be at least 1",
            ));
        }
        let options = IndexOptions { verify_checksums };
        let index = py
            .detach(|| ShardIndex::open(&dir, &options))
            .map_err(py_err)?;
        let pack_length =
            PlanConfig::packing_length(&index, packing, pack_across_batches, pack_length);
        let dataset = Self {
            index,
            plan: PlanConfig {
                seed,
                world_size,
                batch_size,
                pack_length,
                across_batches: pack_across_batches,
            },
            rank,
            loader_config: LoaderConfig {
                workers,
                prefetch: prefetch.unwrap_or(workers),
                pixels: if normalize {
                    PixelFormat::F32
                } else {
                    PixelFormat::U8
                },
                on_corrupt,
            },
            state: DataState::new(epoch),
            loader: None,
            exhausted: false,
            share: None,
            loader_pid: std::process::id(),
            loader_epoch: epoch,
            args,
        };
        // An unsupported batch size fails here, not at the first batch.
        dataset.epoch_plan(&dataset.state)?;
        Ok(dataset)
    }

    /// Starts (or restarts) iteration at the next batch not yet handed out (in a DataLoader
    /// worker: this worker's share of the batches from there).
    fn __iter__(mut slf: PyRefMut<'_, Self>) -> PyResult<PyRefMut<'_, Self>> {
        slf.stop();
        slf.exhausted = false;
        slf.share = torch_worker(slf.py())?;
        Ok(slf)
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        if self.exhausted {
            return Ok(None);
        }
        if self.loader.is_none() {
            let batches = self
                .epoch_plan(&self.state)?
                .rank_batches(&self.index, self.rank)
                .map_err(py_err)?;
            let loader = match self.share {
                // Batch i of this iteration goes to worker i % n: disjoint shares that the
                // DataLoader, taking one batch from each worker in turn, yields in plan order.
                Some((id, n)) => Loader::new(
                    self.index.clone(),
                    batches.skip(id).step_by(n),
                    &self.loader_config,
                ),
                None => Loader::new(self.index.clone(), batches, &self.loader_config),
            }
            .map_err(py_err)?;
            self.loader = Some(Mutex::new(loader));
            self.loader_pid = std::process::id();
            self.loader_epoch = self.state.epoch;
        }
        let Some(loader) = self.loader.as_mut() else {
            return Ok(None);
        };
        let loader = loader.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Wait for the batch without the GIL: the training thread and others keep running.
        match py.detach(|| loader.next()) {
            None => {
                self.stop();
                self.exhausted = true;
                if self.share.is_some() {
                    // The other workers handed out the rest of the epoch.
                    self.state = self.end_of_epoch();
                }
                Ok(None)
            }
            Some(Err(e)) => {
                // The state still points at the failed batch: iterating again retries it.
                self.stop();
                Err(py_err(e))
            }
            Some(Ok(batch)) => {
                self.state = batch.next_state;
                let dict = batch_dict(py, batch)?;
                dict.set_item("state", state_dict(py, &self.state)?)?;
                Ok(Some(dict))
            }
        }
    }

    /// Batches the next iteration yields (the rest of the current epoch).
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.epoch_plan(&self.state)?.num_steps())
    }

    /// The data state after the last batch handed out, as a dict of ints (llava-trainer's
    /// DataState: epoch, position, step, anchor, anchor_step, world_size, batch_size, seed).
    /// In a DataLoader worker process this is the worker's own; the main process's object does
    /// not advance: use each batch's "state" there.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        state_dict(py, &self.state)
    }

    /// Pickling (DataLoader workers started with spawn or forkserver): the constructor's
    /// arguments and the state; the copy opens the index again.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let this = slf.borrow();
        let a = &this.args;
        let args = PyTuple::new(
            py,
            [
                a.dir.clone().into_pyobject(py)?.into_any(),
                this.rank.into_pyobject(py)?.into_any(),
                a.world_size.into_pyobject(py)?.into_any(),
                a.seed.into_pyobject(py)?.into_any(),
                a.workers.into_pyobject(py)?.into_any(),
                this.state.epoch.into_pyobject(py)?.into_any(),
                a.batch_size.into_pyobject(py)?.into_any(),
                a.normalize.into_pyobject(py)?.to_owned().into_any(),
                a.prefetch.into_pyobject(py)?.into_any(),
                a.verify_checksums.into_pyobject(py)?.to_owned().into_any(),
                a.packing.into_pyobject(py)?.to_owned().into_any(),
                a.pack_length.into_pyobject(py)?.into_any(),
                a.on_corrupt.as_str().into_pyobject(py)?.into_any(),
                a.pack_across_batches
                    .into_pyobject(py)?
                    .to_owned()
                    .into_any(),
            ],
        )?;
        let state = state_dict(py, &this.state)?;
        PyTuple::new(
            py,
            [slf.get_type().into_any(), args.into_any(), state.into_any()],
        )
    }

    fn __setstate__(&mut self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        self.load_state_dict(state)
    }

    /// Continues from a state_dict(): the next batch is the one after the saved state's. The
    /// world size may differ from the saved one (the remaining global order is kept); the seed
    /// and batch size may not change mid-epoch.
    fn load_state_dict(&mut self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let known = match serde_json::to_value(DataState::default()) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return Err(PyRuntimeError::new_err("data state has no fields")),
        };
        let mut map = serde_json::Map::new();
        for (k, v) in state.iter() {
            let key: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("data state keys must be strings"))?;
            if !known.contains_key(&key) {
                return Err(PyKeyError::new_err(format!(
                    "unknown data state key {key:?} (expected {})",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            let n: u64 = v.extract().map_err(|_| {
                PyTypeError::new_err(format!("data state {key} must be a non-negative int"))
            })?;
            map.insert(key, n.into());
        }
        let parsed: DataState = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| PyKeyError::new_err(format!("invalid data state: {e}")))?;
        // Refuse a state this dataset cannot continue from before dropping the current one.
        self.epoch_plan(&parsed)?;
        self.stop();
        self.state = parsed;
        self.exhausted = false;
        Ok(())
    }

    /// Moves to the start of `epoch` (like DistributedSampler.set_epoch); a no-op when the
    /// dataset is already there.
    fn set_epoch(&mut self, epoch: u64) {
        if self.state.epoch != epoch || self.state.position != 0 {
            self.stop();
            self.state = DataState::new(epoch);
        }
        self.exhausted = false;
    }

    /// The epoch the next batch belongs to.
    #[getter]
    fn epoch(&self) -> u64 {
        self.state.epoch
    }

    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    #[getter]
    fn world_size(&self) -> usize {
        self.plan.world_size
    }

    /// Samples in the shards (all ranks).
    #[getter]
    fn num_samples(&self) -> usize {
        self.index.samples.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "ShardDataset({:?}, rank={}, world_size={}, seed={}, epoch={}, samples={})",
            self.index.dir.display().to_string(),
            self.rank,
            self.plan.world_size,
            self.plan.seed,
            self.state.epoch,
            self.index.samples.len()
        )
    }
}

/// A data state as the dict of ints `state_dict()` gives.
fn state_dict<'py>(py: Python<'py>, state: &DataState) -> PyResult<Bound<'py, PyDict>> {
    let value = serde_json::to_value(state)
        .map_err(|e| PyRuntimeError::new_err(format!("data state: {e}")))?;
    let dict = PyDict::new(py);
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            let n = v.as_u64().ok_or_else(|| {
                PyRuntimeError::new_err(format!("data state field {k} is not an integer"))
            })?;
            dict.set_item(k, n)?;
        }
    }
    Ok(dict)
}

/// One collated batch as the reference collator's dict (see [`ShardDataset`]).
fn batch_dict<'py>(py: Python<'py>, batch: Batch) -> PyResult<Bound<'py, PyDict>> {
    let (b, l) = (batch.num_rows(), batch.seq_len);
    let s = batch.tile_size;
    let dict = PyDict::new(py);
    let widen = |v: &[i32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<i64>>();
    dict.set_item(
        "input_ids",
        PyArray1::from_vec(py, widen(&batch.input_ids)).reshape([b, l])?,
    )?;
    dict.set_item(
        "labels",
        PyArray1::from_vec(py, widen(&batch.labels)).reshape([b, l])?,
    )?;
    let mask: Vec<bool> = batch.attention_mask.iter().map(|&m| m != 0).collect();
    dict.set_item(
        "attention_mask",
        PyArray1::from_vec(py, mask).reshape([b, l])?,
    )?;

    // All tiles stay in the loader's one buffer (NumPy takes the Vec over); each image is a view.
    let shape = [batch.num_tiles, 3, s, s];
    let (tiles, dummy) = match batch.pixels {
        Pixels::F32(v) => (
            PyArray1::from_vec(py, v).reshape(shape)?.into_any(),
            PyArray::<f32, _>::zeros(py, [1, 3, s, s], false).into_any(),
        ),
        Pixels::U8(v) => (
            PyArray1::from_vec(py, v).reshape(shape)?.into_any(),
            PyArray::<u8, _>::zeros(py, [1, 3, s, s], false).into_any(),
        ),
    };
    // First tile of each image: images are in tile order.
    let mut first_tile = Vec::with_capacity(batch.images.len());
    let mut at = 0usize;
    for img in &batch.images {
        first_tile.push(at);
        at += img.num_tiles as usize;
    }
    let images = PyList::empty(py);
    let sizes = PyList::empty(py);
    let modalities = PyList::empty(py);
    let side = u32::try_from(s).unwrap_or(u32::MAX);
    for &sample in batch.rows.iter().flatten() {
        let mut any = false;
        for (img, &start) in batch.images.iter().zip(&first_tile) {
            if img.sample != sample {
                continue;
            }
            any = true;
            let end = start + img.num_tiles as usize;
            let slice = PySlice::new(py, start as isize, end as isize, 1);
            images.append(tiles.get_item(slice)?)?;
            sizes.append((img.width, img.height))?;
            modalities.append("image")?;
        }
        if !any {
            images.append(dummy.clone())?;
            sizes.append((side, side))?;
            modalities.append("text")?;
        }
    }
    dict.set_item("images", images)?;
    dict.set_item("image_sizes", sizes)?;
    dict.set_item("modalities", modalities)?;
    let ids = PyList::empty(py);
    for id in &batch.samples {
        ids.append((id.source.as_str(), id.index, id.id.as_str()))?;
    }
    dict.set_item("ids", ids)?;
    let lengths: Vec<i64> = batch
        .lengths
        .iter()
        .map(|&n| i64::try_from(n).unwrap_or(i64::MAX))
        .collect();
    dict.set_item("lengths", PyArray1::from_vec(py, lengths))?;
    dict.set_item("rows", batch.rows)?;
    dict.set_item("segments", batch.segments)?;
    dict.set_item("tokens", batch.tokens)?;
    let skipped: Vec<String> = batch.skipped.iter().map(ToString::to_string).collect();
    dict.set_item("skipped", skipped)?;
    Ok(dict)
}

/// The Python module `llava_data`.
#[pymodule]
#[pyo3(name = "llava_data")]
fn llava_data_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ShardDataset>()?;
    m.add("PAD_ID", i64::from(PAD_ID))?;
    m.add("IGNORE_INDEX", IGNORE_INDEX)?;
    // The keys the reference model's forward takes (the others are for logging and checks).
    m.add(
        "MODEL_KEYS",
        (
            "input_ids",
            "labels",
            "attention_mask",
            "images",
            "image_sizes",
            "modalities",
        ),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
