//! Learning-rate schedule: linear warmup to the peak, then cosine, linear or constant down to
//! a floor. Steps are 1-based: step 1 already trains (no wasted step at lr 0).

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak: f64,
    pub min: f64,
    /// Never more than `total`.
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    pub fn new(kind: ScheduleKind, peak: f64, min: f64, warmup: usize, total: usize) -> Self {
        Self {
            kind,
            peak,
            min: min.min(peak),
            warmup: warmup.min(total),
            total,
        }
    }

    /// Learning rate of optimizer step `step` (1-based).
    pub fn lr(&self, step: usize) -> f64 {
        let step = step.clamp(1, self.total.max(1));
        if step <= self.warmup {
            return self.peak * step as f64 / self.warmup as f64;
        }
        let decay_steps = self.total - self.warmup;
        // After warmup: progress 0 at the first decay step's start, 1 at the last step.
        let progress = (step - self.warmup) as f64 / decay_steps as f64;
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Linear => self.peak - (self.peak - self.min) * progress,
            ScheduleKind::Cosine => {
                self.min
                    + (self.peak - self.min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_small_schedule_is_finite_bounded_and_shaped() {
        for kind in [
            ScheduleKind::Cosine,
            ScheduleKind::Linear,
            ScheduleKind::Constant,
        ] {
            for total in 1..40 {
                for warmup in 0..45 {
                    let s = Schedule::new(kind, 1e-4, 1e-6, warmup, total);
                    let lrs: Vec<f64> = (1..=total).map(|i| s.lr(i)).collect();
                    for (i, lr) in lrs.iter().enumerate() {
                        assert!(
                            lr.is_finite() && *lr > 0.0 && *lr <= 1e-4 + 1e-18,
                            "{kind:?} {total} {warmup} step {}: {lr}",
                            i + 1
                        );
                    }
                    let w = warmup.min(total);
                    // Warmup rises to the peak exactly at its last step.
                    if w > 0 {
                        assert!((lrs[w - 1] - 1e-4).abs() < 1e-18);
                        assert!(lrs.windows(2).take(w - 1).all(|p| p[1] > p[0]));
                    }
                    // Decay never rises and ends at the floor (except constant).
                    assert!(lrs[w.max(1) - 1..].windows(2).all(|p| p[1] <= p[0] + 1e-18));
                    if kind != ScheduleKind::Constant && total > w {
                        assert!(
                            (lrs[total - 1] - 1e-6).abs() < 1e-15,
                            "{kind:?} {total} {warmup}"
                        );
                    }
                }
            }
        }
    }
}
