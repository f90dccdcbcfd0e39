//! What a finished run reports: its figures, printed at the end and returned to the caller.

use super::checkpoint::TrainerState;
use crate::engine::Profile;
use crate::runtime::memory;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub skipped: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub seconds: f64,
    /// This process's steps: how many, their tokens (all, trained) and their time (steps
    /// only: evaluation, checkpoints and loading left out), for the rates.
    pub run_steps: usize,
    pub run_tokens: (usize, usize),
    pub step_seconds: f64,
    pub peak_rss: Option<u64>,
    /// MLX's peak (the MLX engine, on any backend).
    pub peak_mlx: Option<u64>,
    pub first_val: Option<f64>,
    pub last_val: Option<f64>,
    pub best_val: Option<(usize, f64)>,
    pub test: Option<(f64, usize)>,
    /// Preference tuning's test set: its loss, reward accuracy and pairs.
    pub test_pairs: Option<(f64, f64, usize)>,
    pub adapter_dir: PathBuf,
    pub final_loss: f64,
    /// Per-phase times, with `--profile`.
    pub profile: Option<Profile>,
}

impl Summary {
    /// Nothing trained yet; the adapter goes to `adapter_dir`.
    pub fn new(adapter_dir: &Path) -> Self {
        Self {
            steps: 0,
            skipped: 0,
            tokens: 0,
            trained_tokens: 0,
            seconds: 0.0,
            run_steps: 0,
            run_tokens: (0, 0),
            step_seconds: 0.0,
            peak_rss: None,
            peak_mlx: None,
            first_val: None,
            last_val: None,
            best_val: None,
            test: None,
            test_pairs: None,
            adapter_dir: adapter_dir.to_path_buf(),
            final_loss: f64::NAN,
            profile: None,
        }
    }

    /// The counts a resumed run continues from.
    pub fn resume_from(&mut self, st: &TrainerState) {
        self.steps = st.step;
        self.tokens = st.tokens;
        self.trained_tokens = st.trained_tokens;
        self.skipped = st.skipped;
        self.first_val = st.first_val;
        self.last_val = st.last_val;
        self.best_val = st.best_val;
    }

    pub fn print(&self) {
        let secs = self.step_seconds.max(1e-9);
        eprintln!(
            "\nTraining finished: {} steps in {:.1} s ({} skipped)",
            self.steps, self.seconds, self.skipped
        );
        eprintln!(
            "  tokens: {} total, {} trained",
            self.tokens, self.trained_tokens
        );
        if self.run_steps > 0 {
            // A resumed run's earlier steps took another process's time.
            eprintln!(
                "  speed: {:.0} tokens/s, {:.0} trained tokens/s over {} step(s) (step time only)",
                self.run_tokens.0 as f64 / secs,
                self.run_tokens.1 as f64 / secs,
                self.run_steps
            );
        }
        if let Some(p) = self.peak_rss {
            eprintln!("  peak memory: {:.2} GB resident", memory::gb(p));
        }
        if let Some(p) = self.peak_mlx {
            eprintln!("  peak MLX memory: {:.2} GB", memory::gb(p));
        }
        // NaN when a resumed run had no step left to train (only the final adapter to write).
        if self.final_loss.is_finite() {
            eprintln!("  final train loss: {:.4}", self.final_loss);
        }
        if let (Some(a), Some(b)) = (self.first_val, self.last_val) {
            eprintln!("  validation loss: {a:.4} at start → {b:.4} at end");
        }
        if let Some((step, v)) = self.best_val {
            eprintln!(
                "  best validation loss {v:.4} at step {step} (adapter in {})",
                self.adapter_dir.join("best").display()
            );
        }
        if let Some((loss, tokens)) = self.test {
            eprintln!(
                "  test loss: {loss:.4}, perplexity {:.3} ({tokens} tokens)",
                loss.exp()
            );
        }
        if let Some((loss, accuracy, pairs)) = self.test_pairs {
            eprintln!(
                "  test loss: {loss:.4}, reward accuracy {:.1}% ({pairs} pairs)",
                100.0 * accuracy
            );
        }
        eprintln!("  adapter: {}", self.adapter_dir.display());
        if let Some(p) = &self.profile {
            let total: f64 = p.phases().iter().map(|x| x.1).sum();
            eprintln!(
                "\nTime by phase ({} steps; per step, and share of the run):",
                self.steps
            );
            let line = |name: &str, secs: f64| {
                eprintln!(
                    "  {name:<32} {:>8.3} s/step {:>5.1}%",
                    secs / self.steps.max(1) as f64,
                    100.0 * secs / total.max(1e-9)
                )
            };
            // A phase at zero did not run, or this engine does not time it apart (the MLX
            // engine's backward holds its recompute, and its attention is not split out).
            for (name, secs) in p.phases() {
                if secs > 0.0 {
                    line(name, secs);
                }
            }
            if !p.attention.is_zero() {
                line(
                    "  of which attention (all blocks)",
                    p.attention.as_secs_f64(),
                );
            }
        }
    }
}
