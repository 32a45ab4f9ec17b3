//! `llava-trainer parity`: the model on a device against a fixture's HF goldens, as JSON; the
//! exit status is 1 when a check passes its tolerance (docs/gpu.md).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use llava_trainer::diag::parity::Tolerances;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  llava-trainer parity --fixture fixtures/tiny-llava-next-a \
                        --device cuda --json\n  llava-trainer parity --device cpu --tighten 1e6   \
                        # shows that a check can fail\n\n\
                        f32 runs are held to the CPU parity test's allclose limits (logits atol \
                        1e-4 rtol 1e-4, loss atol 1e-5, gradients atol 1e-5 rtol 1e-3); bf16 \
                        runs to a loss relative error of 5e-3 and a gradient cosine of 0.998 \
                        (docs/gpu.md says why). Exit status 1 when a check fails; the JSON is \
                        printed either way."
)]
pub struct Args {
    /// Fixture folder (model/, inputs.safetensors, expected.safetensors, fixture.json).
    #[arg(long, default_value = "fixtures/tiny-llava-next-a")]
    fixture: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Run the model in bf16 (the goldens are f32: checked by loss relative error and gradient
    /// cosine instead of allclose).
    #[arg(long)]
    bf16: bool,
    /// Divide every limit by this factor (also LLAVA_PARITY_TIGHTEN); above the measured
    /// error's ratio to its limit, the check fails.
    #[arg(long)]
    tighten: Option<f64>,
    /// Print JSON only.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let tighten = match (args.tighten, std::env::var("LLAVA_PARITY_TIGHTEN")) {
        (Some(t), _) => t,
        (None, Ok(v)) => v
            .trim()
            .parse()
            .with_context(|| format!("LLAVA_PARITY_TIGHTEN={v:?} is not a number"))?,
        (None, Err(_)) => 1.0,
    };
    if !(tighten.is_finite() && tighten > 0.0) {
        bail!("--tighten must be a positive number, got {tighten}");
    }
    let dev = super::device::parse(&args.device)?;
    let tol = Tolerances {
        tighten,
        ..Tolerances::default()
    };
    let report = llava_trainer::diag::parity::run_parity(&args.fixture, &dev, args.bf16, &tol)
        .with_context(|| format!("parity against {}", args.fixture.display()))?;
    if !args.json {
        eprintln!(
            "logits max abs {:.3e}, loss error {:.3e} (rel {:.3e}), gradients max abs {:.3e} / \
             rel {:.3e}, min cosine {:.6} over {} parameters",
            report.logits.max_abs,
            report.loss_abs_error,
            report.loss_rel_error,
            report.gradients.max_abs,
            report.gradients.max_rel,
            report.gradients.cosine,
            report.gradients_compared
        );
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {:.3e} > limit {:.3e}", c.name, c.measured, c.limit))
        .collect();
    if !failed.is_empty() {
        bail!("parity failed: {}", failed.join("; "));
    }
    Ok(())
}
