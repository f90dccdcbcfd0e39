//! The flag groups a training run is configured by, each declared once with its defaults
//! (which `--help` prints): the LoRA adapter's shape, the schedule, the outputs, and the
//! memory budget. [`super::config::TrainConfig`] is composed of them; their serde names are the
//! keys of `train_config.json` and of a `--config` YAML file.

use super::schedule::ScheduleKind;
use crate::engine::objective::Method;
use crate::model::lora::Target;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The LoRA adapter's shape.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "LoRA")]
pub struct LoraArgs {
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank) [default: 2 × rank].
    #[arg(long, allow_hyphen_values = true)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input during training.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub lora_dropout: f64,
    /// Linear layers that get adapters (comma-separated: q,k,v,o,gate,up,down).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down",
          value_parser = parse_target)]
    #[serde(deserialize_with = "targets_from_names")]
    pub lora_targets: Vec<Target>,
    /// Adapters on the last N blocks only; the backward stops there [default: all].
    #[arg(long)]
    pub num_layers: Option<usize>,
}

impl LoraArgs {
    /// `--lora-alpha`, or its default 2 × rank.
    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f64)
    }

    /// The targets sorted, without repeats.
    pub fn targets(&self) -> Vec<Target> {
        let mut t = self.lora_targets.clone();
        t.sort();
        t.dedup();
        t
    }
}

impl LoraArgs {
    /// Values no run can use, named by their flag.
    pub fn check(&self) -> crate::Result<()> {
        if self.lora_rank == 0 {
            return Err(usage("--lora-rank 0: it must be at least 1".into()));
        }
        if let Some(alpha) = self.lora_alpha {
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(usage(format!(
                    "--lora-alpha {}: it must be a finite positive number",
                    shown(alpha)
                )));
            }
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(usage(format!(
                "--lora-dropout {}: it must be at least 0 and below 1",
                shown(self.lora_dropout)
            )));
        }
        if self.num_layers == Some(0) {
            return Err(usage("--num-layers 0: adapt at least one block".into()));
        }
        if self.lora_targets.is_empty() {
            return Err(usage("--lora-targets: name at least one layer".into()));
        }
        Ok(())
    }
}

fn usage(msg: String) -> crate::error::Error {
    crate::error::Error::Usage(msg)
}

/// A number as a message shows it: `1e308`, not 309 digits.
fn shown(v: f64) -> String {
    if v.is_finite() && v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

fn parse_target(s: &str) -> Result<Target, String> {
    Target::parse(s).ok_or_else(|| format!("`{s}` is not one of q, k, v, o, gate, up, down"))
}

/// `lora_targets` from a config file: a list of names or one comma-separated string.
fn targets_from_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Target>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        List(Vec<String>),
        One(String),
    }
    let names = match Names::deserialize(d)? {
        Names::List(v) => v,
        Names::One(s) => s.split(',').map(str::to_string).collect(),
    };
    names
        .iter()
        .map(|n| parse_target(n).map_err(serde::de::Error::custom))
        .collect()
}

/// What the run optimises: SFT, or a preference objective over chosen/rejected pairs.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Objective")]
pub struct ObjectiveArgs {
    /// sft: cross-entropy on the trained tokens; dpo or orpo: preference tuning on rows of a
    /// prompt with a chosen and a rejected answer (see docs/preference.md).
    #[arg(long, value_enum, default_value_t = Method::Sft)]
    #[serde(default)]
    pub method: Method,
    /// DPO's β (how far from the reference the policy may move), or ORPO's λ (the weight of
    /// its odds-ratio term).
    #[arg(long, default_value_t = 0.1, allow_hyphen_values = true)]
    #[serde(default = "default_beta")]
    pub beta: f64,
}

fn default_beta() -> f64 {
    0.1
}

impl ObjectiveArgs {
    pub fn check(&self) -> crate::Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(usage(format!(
                "--beta {}: it must be a finite positive number",
                shown(self.beta)
            )));
        }
        Ok(())
    }
}

/// How long training runs, on which batches, at which learning rate.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Schedule")]
pub struct ScheduleArgs {
    /// Optimizer steps to run (one step = one progress-bar step).
    #[arg(
        long,
        visible_alias = "iters",
        default_value_t = 5000,
        conflicts_with = "epochs"
    )]
    pub max_steps: usize,
    /// Train for this many passes over the data instead of --max-steps.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accumulation_steps: usize,
    /// Pack several examples per row (attention and positions stay per example).
    #[arg(long)]
    pub pack: bool,
    /// Peak learning rate.
    // `-1e-3` is a value to refuse with its reason, not an unknown flag `-1` (clap's
    // negative numbers do not take an exponent).
    #[arg(long, default_value_t = 5e-5, allow_hyphen_values = true)]
    pub learning_rate: f64,
    /// Learning-rate decay after warmup.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    pub lr_schedule: ScheduleKind,
    /// Linear warmup steps (never more than the run's steps).
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    /// Learning-rate floor at the end of the decay.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub min_lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01, allow_hyphen_values = true)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub max_grad_norm: f64,
    /// Seed for adapter initialisation and data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl ScheduleArgs {
    /// Values no run can use, named by their flag.
    pub fn check(&self) -> crate::Result<()> {
        if self.grad_accumulation_steps == 0 {
            return Err(usage(
                "--grad-accumulation-steps 0: it must be at least 1".into(),
            ));
        }
        if self.epochs.is_none() && self.max_steps == 0 {
            return Err(usage("--max-steps 0: train for at least one step".into()));
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0) {
                return Err(usage(format!(
                    "--epochs {}: it must be a finite positive number",
                    shown(e)
                )));
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(usage(format!(
                "--learning-rate {}: it must be a finite positive number",
                shown(self.learning_rate)
            )));
        }
        for (v, flag) in [
            (self.min_lr, "--min-lr"),
            (self.weight_decay, "--weight-decay"),
            (self.max_grad_norm, "--max-grad-norm"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(usage(format!(
                    "{flag} {}: it must be zero or a finite positive number",
                    shown(v)
                )));
            }
        }
        if self.min_lr > self.learning_rate {
            return Err(usage(format!(
                "--min-lr {} is above --learning-rate {}: the schedule decays from the learning rate down to --min-lr; give a smaller --min-lr",
                shown(self.min_lr),
                shown(self.learning_rate)
            )));
        }
        Ok(())
    }
}

/// What a run writes besides the adapter, and when.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Where the adapter, checkpoints and metrics go [default: models/<model-name>-lora].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Per-step metrics as JSON lines [default: <output>/metrics.jsonl].
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
    /// Replace an earlier run in --output (its adapter, best/, checkpoints/ and metrics);
    /// without it (or --resume), a non-empty --output is refused.
    #[arg(long)]
    #[serde(skip_serializing, default)]
    pub force: bool,
    /// Validation every N steps (also at step 0 and at the end; 0: only those).
    #[arg(long, default_value_t = 200)]
    pub steps_per_eval: usize,
    /// Validation batches per evaluation (0: the whole validation set).
    #[arg(long, default_value_t = 25)]
    pub val_batches: usize,
    /// Save a checkpoint every N steps under <output>/checkpoints (also at the end).
    #[arg(long, default_value_t = 500)]
    pub save_every: usize,
    /// Checkpoints kept under <output>/checkpoints (the newest).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Report test-set loss and perplexity at the end.
    #[arg(long)]
    pub test: bool,
    /// Keep the adapter with the best validation loss in <output>/best (the default).
    #[arg(long, default_value_t = true, overrides_with = "no_save_best")]
    pub save_best: bool,
    /// Do not keep a best-validation adapter.
    #[arg(long)]
    #[serde(skip_serializing, default)]
    pub no_save_best: bool,
    /// Print a memory line every N steps.
    #[arg(long)]
    pub memory_report_interval: Option<usize>,
    /// Print the time spent in each phase of the training step at the end.
    #[arg(long)]
    pub profile: bool,
}

/// `--max-memory`: the budget every memory-aware command holds to.
#[derive(Debug, Clone, Copy, Default, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Memory")]
pub struct BudgetArgs {
    /// Memory budget in GB [default: 80% of the device's memory, at most 120 GB]. A run whose
    /// estimate exceeds it does not start; one that crosses it saves a checkpoint and stops.
    #[arg(long, value_name = "GB", value_parser = parse_gb, allow_hyphen_values = true)]
    pub max_memory: Option<f64>,
}

/// A memory size in GB: positive, and at most [`MAX_GB`] (past it, a byte count overflows).
pub fn parse_gb(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb > 0.0 && gb <= MAX_GB => Ok(gb),
        _ => Err(format!(
            "give the size in GB as a positive number, at most {MAX_GB}"
        )),
    }
}

/// The largest memory size in GB a flag takes: a million GB.
pub const MAX_GB: f64 = 1e6;

/// How training holds to its memory budget.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Memory")]
pub struct MemoryArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub budget: BudgetArgs,
    /// When the estimate exceeds the budget, train with the largest batch size that fits
    /// instead of refusing.
    #[arg(long)]
    pub auto_fit: bool,
    /// Adapted blocks that keep their activations for the backward instead of recomputing
    /// them: auto (as many as 90% of the memory budget has room for: no recompute when memory
    /// allows), none (the smallest peak, one extra forward per step), all, or a number.
    #[arg(long, default_value = "auto")]
    pub keep_activations: KeepActivations,
    /// Every N steps: checkpoint, drop the model, adapter and optimizer, reload them and go on.
    /// A workaround other tools need for memory that grows step by step; your_ai's steps are
    /// flat, so it is not needed, but it works exactly (same losses and adapter).
    #[arg(long, value_name = "N")]
    pub reload_interval: Option<usize>,
    /// For tests: from step STEP on, the budget the step checks is BYTES, so that a run can
    /// cross it on demand.
    #[arg(long, hide = true, value_name = "BYTES@STEP", value_parser = parse_test_limit)]
    #[serde(skip)]
    pub test_memory_limit: Option<(u64, usize)>,
}

impl OutputArgs {
    /// Values no run can use, named by their flag.
    pub fn check(&self) -> crate::Result<()> {
        if self.memory_report_interval == Some(0) {
            return Err(usage(
                "--memory-report-interval 0: give a number of steps (at least 1), or leave the \
                 flag out"
                    .into(),
            ));
        }
        if self.keep_checkpoints == 0 {
            return Err(usage(
                "--keep-checkpoints 0: keep at least 1 (a run resumes from its newest checkpoint)"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl MemoryArgs {
    /// Values no run can use, named by their flag.
    pub fn check(&self) -> crate::Result<()> {
        if self.reload_interval == Some(0) {
            return Err(usage(
                "--reload-interval 0: give a number of steps (at least 1), or leave the flag out"
                    .into(),
            ));
        }
        Ok(())
    }
}

pub fn parse_test_limit(s: &str) -> Result<(u64, usize), String> {
    let (bytes, step) = s.split_once('@').unwrap_or((s, "0"));
    match (bytes.parse(), step.parse()) {
        (Ok(b), Ok(st)) => Ok((b, st)),
        _ => Err("give BYTES@STEP, for example 100000000@3".into()),
    }
}

/// `--keep-activations`: recomputing a block in the backward costs one more forward of it;
/// keeping its activations costs memory instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepActivations {
    /// As many blocks as the memory budget has room for.
    Auto,
    All,
    None,
    Blocks(usize),
}

/// From a config file: `auto`, `all`, `none` or a number of blocks.
impl<'de> serde::Deserialize<'de> for KeepActivations {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Given {
            Blocks(usize),
            Name(String),
            Tagged { blocks: usize },
        }
        match Given::deserialize(d)? {
            Given::Blocks(n) | Given::Tagged { blocks: n } => Ok(Self::Blocks(n)),
            Given::Name(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for KeepActivations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "all" => Ok(Self::All),
            "none" => Ok(Self::None),
            n => n
                .parse()
                .map(Self::Blocks)
                .map_err(|_| format!("`{n}`: expected auto, all, none or a number of blocks")),
        }
    }
}
