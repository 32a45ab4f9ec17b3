//! Peak memory over the timed steps: live heap bytes (or RSS) on the CPU, the driver's view
//! sampled every 2 ms on CUDA.

#[cfg(feature = "cuda")]
use std::time::Duration;

use candle_core::Device;
use llava_formats::process::status_kib;

use crate::{Error, Result};

/// Peak memory over a span: RSS high-water mark on the CPU, sampled driver use on CUDA.
pub(super) struct MemoryProbe {
    baseline: u64,
    #[allow(dead_code)]
    sampler: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<u64>,
    )>,
    cpu: bool,
}

impl MemoryProbe {
    pub(super) fn start(dev: &Device) -> Result<Self> {
        match dev {
            Device::Cpu if crate::diag::heap::is_installed() => {
                crate::diag::heap::reset_peak();
                Ok(Self {
                    baseline: crate::diag::heap::live(),
                    sampler: None,
                    cpu: true,
                })
            }
            Device::Cpu => {
                // Reset the high-water mark so the peak is this span's (Linux ≥ 4.0).
                let _ = std::fs::write("/proc/self/clear_refs", "5");
                Ok(Self {
                    baseline: status_kib(None, "VmRSS:").unwrap_or(0) * 1024,
                    sampler: None,
                    cpu: true,
                })
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                use candle_core::cuda::cudarc::driver::result::mem_get_info;
                use std::sync::atomic::{AtomicBool, Ordering};
                let used = || mem_get_info().map(|(free, total)| (total - free) as u64);
                let baseline = used().map_err(|e| Error::Config(format!("cuda memory: {e}")))?;
                let stop = std::sync::Arc::new(AtomicBool::new(false));
                let flag = stop.clone();
                let stream = cuda.cuda_stream();
                let handle = std::thread::spawn(move || {
                    let _ = stream.context().bind_to_thread();
                    let mut peak = 0u64;
                    while !flag.load(Ordering::Relaxed) {
                        if let Ok((free, total)) = mem_get_info() {
                            peak = peak.max((total - free) as u64);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    peak
                });
                Ok(Self {
                    baseline,
                    sampler: Some((stop, handle)),
                    cpu: false,
                })
            }
            _ => Err(Error::Config("bench: unsupported device".into())),
        }
    }

    /// `(peak, baseline, method)`.
    pub(super) fn finish(self) -> Result<(u64, u64, String)> {
        if self.cpu && crate::diag::heap::is_installed() {
            return Ok((
                crate::diag::heap::peak(),
                self.baseline,
                "cpu: peak live heap bytes (counting global allocator)".into(),
            ));
        }
        if self.cpu {
            let peak = status_kib(None, "VmHWM:").unwrap_or(0) * 1024;
            return Ok((peak, self.baseline, "cpu: peak RSS (VmHWM)".into()));
        }
        let peak = match self.sampler {
            Some((stop, handle)) => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                handle.join().unwrap_or(0)
            }
            None => 0,
        };
        Ok((
            peak,
            self.baseline,
            "cuda: device memory in use (driver view, sampled every 2 ms)".into(),
        ))
    }
}
