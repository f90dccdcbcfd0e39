//! `train`'s distrust flags.

use clap::Args;
use serde::{Deserialize, Serialize};

/// Distrust weighting of the loss (see `your_ai score`).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Distrust")]
pub struct DistrustArgs {
    /// Weight each example's loss by its distrust D (on by default when the training rows have
    /// auth_weight and prov_entropy; see `your_ai score`).
    #[arg(long, overrides_with = "no_distrust")]
    pub distrust: bool,
    /// Plain training even when the rows carry auth_weight and prov_entropy.
    #[arg(long)]
    pub no_distrust: bool,
    /// α of D = α·(ln(1 − w + 1e-8) + H)² (valid range 2.3–3.0).
    #[arg(long, default_value_t = crate::distrust::formula::DEFAULT_ALPHA)]
    pub alpha: f64,
    /// λ in [0, 1]: example weight c = (1 − λ) + λ·D/mean(D); 0 is plain training.
    #[arg(long, default_value_t = crate::distrust::formula::DEFAULT_LAMBDA)]
    pub lambda_weight: f64,
}
