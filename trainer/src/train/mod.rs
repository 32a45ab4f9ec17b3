//! The training loop: shards → loader → model → AdamW, with checkpoints and exact resume.
//!
//! One optimizer step = `grad_accum` micro-batches of one epoch; their gradients are averaged
//! (the mean of per-micro-batch means, spec §5.4). An epoch's last `n % grad_accum`
//! micro-batches are dropped. Ranks of a data-parallel group (threads on the CPU, NCCL processes on
//! GPUs) run this same loop on their own share of each batch; rank 0 logs and saves.
//!
//! - `run`: the loop each rank runs; `start`: what happens before its first step (checks,
//!   loading, resume); `control`: stop, save or go on after a step; [`signals`]: the signals
//!   that ask for it; `launched`: one rank of a launcher's job (join, run, finish).
//! - [`step`]: one step's compute (forward and backward of each micro-batch); [`optim`] and
//!   [`schedule`]: AdamW and the learning rate.
//! - `evaluate` and `eval_generate`: evaluation loss and generations during training; `log` and
//!   [`tensorboard`]: where a step's numbers go; `save`: writing checkpoints.
//! - `config`: the run's settings ([`TrainConfig`]); `compat`: checks between shards and model,
//!   and a loader batch as a model batch.

mod compat;
mod config;
mod control;
mod eval_generate;
mod evaluate;
mod launched;
mod log;
pub mod optim;
mod run;
mod save;
pub mod schedule;
pub mod signals;
mod start;
pub mod step;
mod stream;
pub mod tensorboard;

pub use compat::{
    check_compatible, memory_plan, normalize_on_device, source_config, to_model_batch,
};
pub use config::{resolve_paths, TrainConfig, TunableParts, PATH_KEYS};
pub use control::Control;
pub use eval_generate::GenerateLog;
pub use evaluate::EvalLog;
pub use launched::{run_nccl_rank, run_tcp_rank};
pub use log::{CorruptLog, StepLog};
pub use run::{run, run_joined, run_rank, run_threads, RunOptions, Summary, COLLECTIVE_TIMEOUT};
pub use signals::Signals;
pub use start::load_for_training;
