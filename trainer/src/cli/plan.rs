//! `llava-trainer plan`: the per-device memory a `run` would need, before loading anything big.

use anyhow::{Context, Result};
use llava_loader::{IndexOptions, ShardIndex};
use llava_trainer::train;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  llava-trainer plan --config train.toml --device cuda\n  \
                  llava-trainer plan --config train.toml --world-size 8 --capacity-gib 80\n\n\
                  Takes the flags of `run` (and its --config)."
)]
pub struct Args {
    #[command(flatten)]
    run: super::run::Args,
    /// Data-parallel ranks (the optimizer state is split over them with --zero-stage 1 or 2).
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Device memory in GiB (default: the device's own, or this machine's RAM for the CPU).
    #[arg(long)]
    capacity_gib: Option<f64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let capacity = match args.capacity_gib {
        Some(g) => Some((g * (1u64 << 30) as f64) as u64),
        None => {
            let dev = super::device::parse(&args.run.device_spec())?;
            llava_trainer::diag::memory::device_capacity(&dev)
        }
    };
    let cfg = super::run_config::merged(args.run)?;
    let index = ShardIndex::open(&cfg.shards, &IndexOptions::default())
        .with_context(|| format!("opening shards {}", cfg.shards.display()))?;
    let model = train::source_config(&cfg.source)?;
    let (plan, advice) = train::memory_plan(&cfg, &model, &index, args.world_size, capacity)?;
    if args.json {
        let v = serde_json::json!({"plan": plan, "capacity": capacity, "fits": advice.is_none(),
                                   "advice": advice});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!(
            "parameters {} ({} trainable)\nweights     {:>8.2} GiB\ngradients   {:>8.2} GiB\n\
             optimizer   {:>8.2} GiB\nactivations {:>8.2} GiB (estimate)\ncheckpoint  {:>8.2} GiB \
             (peak while saving)\ntotal       {:>8.2} GiB per device{}",
            plan.parameters,
            plan.trainable_parameters,
            gib(plan.weights),
            gib(plan.gradients),
            gib(plan.optimizer),
            gib(plan.activations),
            gib(plan.checkpoint),
            gib(plan.total),
            capacity.map_or(String::new(), |c| format!(" of {:.2} GiB", gib(c)))
        );
        if let Some(a) = advice {
            println!("does not fit: {a}");
        }
    }
    Ok(())
}
