//! The signals a training process answers. SIGINT (Ctrl-C) and SIGTERM (what Slurm and
//! Kubernetes send before killing a preempted job): finish the step, checkpoint, exit 130 / 143
//! so that a wrapper knows training did not finish; a second one exits at once. SIGUSR1
//! (Slurm's `--signal=USR1@120`): checkpoint at the next step boundary and go on. With several
//! ranks, rank 0's flags decide for all ([`super::control`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};

use crate::{Error, Result};

/// The flags the handlers set, for [`super::RunOptions`].
pub struct Signals {
    /// Set by the first SIGINT / SIGTERM.
    pub stop: Arc<AtomicBool>,
    /// Set by SIGUSR1 (the loop clears it once saved).
    pub save_now: Arc<AtomicBool>,
    exit_code: Arc<AtomicUsize>,
}

impl Signals {
    /// Installs the handlers for this process.
    pub fn install() -> Result<Self> {
        let io = |what: &'static str, source| Error::Setup { what, source };
        let stop = Arc::new(AtomicBool::new(false));
        let exit_code = Arc::new(AtomicUsize::new(0));
        for (sig, code) in [(SIGINT, 130), (SIGTERM, 143)] {
            signal_hook::flag::register_conditional_shutdown(sig, code, stop.clone())
                .map_err(|e| io("the signal handlers", e))?;
            signal_hook::flag::register_usize(sig, exit_code.clone(), code as usize)
                .map_err(|e| io("the signal handlers", e))?;
            signal_hook::flag::register(sig, stop.clone())
                .map_err(|e| io("the signal handlers", e))?;
        }
        let save_now = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(SIGUSR1, save_now.clone())
            .map_err(|e| io("the SIGUSR1 handler", e))?;
        Ok(Self {
            stop,
            save_now,
            exit_code,
        })
    }

    /// The exit code of the stopping signal received (130 for SIGINT, 143 for SIGTERM), or 0.
    pub fn exit_code(&self) -> i32 {
        self.exit_code.load(Ordering::SeqCst) as i32
    }
}
