//! `llava-trainer parity`: the model on a device against a fixture's HF goldens, as JSON.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  llava-trainer parity --fixture fixtures/tiny-llava-next-a \
                        --device cuda --json"
)]
pub struct Args {
    /// Fixture folder (model/, inputs.safetensors, expected.safetensors, fixture.json).
    #[arg(long, default_value = "fixtures/tiny-llava-next-a")]
    fixture: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Run the model in bf16 (the goldens are f32: expect bf16-sized errors).
    #[arg(long)]
    bf16: bool,
    /// Print JSON only.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let dev = super::device::parse(&args.device)?;
    let report = llava_trainer::parity::run_parity(&args.fixture, &dev, args.bf16)?;
    if !args.json {
        eprintln!(
            "logits max abs {:.3e}, loss error {:.3e}, gradients max abs {:.3e} / rel {:.3e} \
             over {} parameters",
            report.logits.max_abs,
            report.loss_abs_error,
            report.gradients.max_abs,
            report.gradients.max_rel,
            report.gradients_compared
        );
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
