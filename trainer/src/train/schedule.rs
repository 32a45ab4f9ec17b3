//! Learning-rate schedule: HF `get_cosine_schedule_with_warmup` (num_cycles 0.5), spec §7.3.

/// Linear warmup from 0, then a half cosine down to 0.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CosineSchedule {
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    /// `warmup = ceil(warmup_ratio · total_steps)`.
    pub fn new(total_steps: u64, warmup_ratio: f64) -> Self {
        // HF: math.ceil(num_training_steps * warmup_ratio), computed in f64.
        let warmup_steps = (total_steps as f64 * warmup_ratio).ceil().max(0.0) as u64;
        Self {
            warmup_steps,
            total_steps,
        }
    }

    /// Multiplier of every group's lr at optimizer step `s` (0-based: the first step has s = 0,
    /// hence lr 0 when there is any warmup).
    pub fn multiplier(&self, s: u64) -> f64 {
        if s < self.warmup_steps {
            return s as f64 / self.warmup_steps.max(1) as f64;
        }
        let progress = (s - self.warmup_steps) as f64
            / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::CosineSchedule;

    #[test]
    fn warmup_then_cosine() {
        let s = CosineSchedule::new(100, 0.03);
        assert_eq!(s.warmup_steps, 3);
        assert_eq!(s.multiplier(0), 0.0);
        assert!((s.multiplier(1) - 1.0 / 3.0).abs() < 1e-15);
        assert_eq!(s.multiplier(3), 1.0);
        assert!(s.multiplier(99) < 1e-3);
        // ceil: 3% of 10 steps is one warmup step.
        assert_eq!(CosineSchedule::new(10, 0.03).warmup_steps, 1);
    }
}
