//! `--device cpu|cuda|cuda:N`, shared by the subcommands that compute.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// `cpu`, `cuda` (device `LOCAL_RANK`, else 0) or `cuda:N`; `auto` is CUDA when this binary was
/// built with the `cuda` feature, else the CPU.
pub fn parse(spec: &str) -> Result<Device> {
    let local_rank = || -> usize {
        std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    if is_cpu_spec(spec) {
        return Ok(Device::Cpu);
    }
    match spec {
        "auto" | "cuda" => cuda(local_rank()),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => bail!("--device {other:?}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

/// Whether `spec` means the CPU, without opening a device (the `--nproc-per-node` supervisor
/// must not create a CUDA context of its own).
pub fn is_cpu_spec(spec: &str) -> bool {
    spec == "cpu" || (spec == "auto" && !cfg!(feature = "cuda"))
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        bail!(
            "this llava-trainer was built without CUDA: rebuild with `--features cuda` \
             (scripts/build-cuda.sh) or use --device cpu"
        );
    }
    Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}
