//! Learning-rate schedule: linear warmup to the peak, then cosine, linear or constant down
//! toward a floor. Steps are 1-based: step 1 already trains, and the decay reaches the floor
//! one step after the last, so no step is spent at lr 0 (the default floor) at either end.

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
        // After warmup (whose last step is at the peak): progress 1/(n+1) at the first of the
        // n decay steps, n/(n+1) at the last; 1, the floor, would be the step after the run.
        let progress = (step - self.warmup) as f64 / (decay_steps + 1) as f64;
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
                    // Decay never rises and ends above the floor (no step is spent at it),
                    // one decay step from it.
                    assert!(lrs[w.max(1) - 1..].windows(2).all(|p| p[1] <= p[0] + 1e-18));
                    if kind != ScheduleKind::Constant && total > w {
                        let n = (total - w) as f64;
                        let end = match kind {
                            ScheduleKind::Linear => 1e-6 + (1e-4 - 1e-6) / (n + 1.0),
                            _ => {
                                let c = (std::f64::consts::PI * n / (n + 1.0)).cos();
                                1e-6 + (1e-4 - 1e-6) * 0.5 * (1.0 + c)
                            }
                        };
                        assert!(lrs[total - 1] > 1e-6, "{kind:?} {total} {warmup}");
                        assert!(
                            (lrs[total - 1] - end).abs() < 1e-15,
                            "{kind:?} {total} {warmup}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn no_step_trains_at_lr_0_with_the_default_floor() {
        for kind in [ScheduleKind::Cosine, ScheduleKind::Linear] {
            for (warmup, total) in [(0, 1), (0, 2), (1, 1), (3, 10), (0, 5000), (100, 5000)] {
                let s = Schedule::new(kind, 5e-5, 0.0, warmup, total);
                assert!(
                    (1..=total).all(|i| s.lr(i) > 0.0),
                    "{kind:?} warmup {warmup} of {total}"
                );
            }
        }
        // The first decay step is just below the peak, as the last is just above the floor.
        let s = Schedule::new(ScheduleKind::Linear, 1.0, 0.0, 0, 3);
        assert_eq!((s.lr(1), s.lr(2), s.lr(3)), (0.75, 0.5, 0.25));
    }
}
