//! The resolved training configuration: every setting the run uses, after defaults, the YAML
//! file and the command line are combined. Written beside the adapter as `train_config.json`.

use crate::model::lora::Target;
use crate::train::schedule::ScheduleKind;
use std::path::PathBuf;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainConfig {
    pub model: String,
    pub data: PathBuf,
    pub output: PathBuf,
    pub batch_size: usize,
    /// Optimizer steps of the run.
    pub steps: usize,
    pub epochs: Option<f64>,
    pub max_seq_length: usize,
    pub grad_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_schedule: ScheduleKind,
    pub warmup_steps: usize,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_targets: Vec<Target>,
    /// Adapters on the last this many blocks.
    pub num_layers: usize,
    pub mask_prompt: bool,
    pub pack: bool,
    pub steps_per_eval: usize,
    /// Validation batches per evaluation; 0 = the whole validation set.
    pub val_batches: usize,
    pub save_every: usize,
    /// Checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    pub metrics_file: PathBuf,
    pub test: bool,
    pub save_best: bool,
    pub memory_report_interval: Option<usize>,
    /// Print the time spent in each phase of the step at the end.
    pub profile: bool,
    /// How many adapted blocks keep their activations instead of recomputing them.
    pub keep_activations: KeepActivations,
    /// `keep_activations` resolved against the memory budget.
    pub keep_blocks: usize,
    /// Bytes of resident memory the run may use; crossing it saves and stops.
    pub memory_budget: u64,
    /// Reload model, adapter and optimizer from a checkpoint every this many steps.
    pub reload_interval: Option<usize>,
    /// Distrust weighting of the loss (`--distrust`); None for plain training. Part of the
    /// checkpoint's configuration, so a resume with another α or λ is refused.
    pub distrust: Option<DistrustSettings>,
    /// `--quantize`: the frozen block weights kept at 4 or 8 bits (None: at the model's dtype).
    /// Part of the checkpoint's configuration: the quantized base is another base, so a resume
    /// with another setting is refused.
    pub quantize: Option<u8>,
}

/// `--alpha` and `--lambda-weight` of a distrust run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DistrustSettings {
    pub alpha: f64,
    pub lambda: f64,
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
