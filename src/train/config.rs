//! The resolved training configuration: every setting the run uses, after defaults, the YAML
//! file and the command line are combined. Written beside the adapter as `train_config.json`.

use super::settings::{LoraArgs, MemoryArgs, OutputArgs, ScheduleArgs};
use crate::data::args::{BatchArgs, DataArgs};
use crate::model::args::{ModelArgs, QuantizeArgs};
use std::path::Path;

/// A training run's settings: the flag groups it was given (after the YAML file, the command
/// line and `--auto-optimize`), with what defaults left open resolved (`--output`,
/// `--metrics-file`, `--lora-alpha`, `--num-layers`, the warmup capped at the run's steps),
/// and what the run derived (steps, kept blocks, the memory budget, distrust settings). Its JSON
/// is flat: the flags' names are its keys.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub model: ModelArgs,
    #[serde(flatten)]
    pub quantize: QuantizeArgs,
    #[serde(flatten)]
    pub data: DataArgs,
    #[serde(flatten)]
    pub batch: BatchArgs,
    #[serde(flatten)]
    pub schedule: ScheduleArgs,
    #[serde(flatten)]
    pub lora: LoraArgs,
    #[serde(flatten)]
    pub output: OutputArgs,
    #[serde(flatten)]
    pub memory: MemoryArgs,
    /// Optimizer steps of the run (`--max-steps`, or `--epochs` over the data).
    pub steps: usize,
    /// `--keep-activations` resolved against the memory budget.
    pub keep_blocks: usize,
    /// Bytes of memory the run may use; crossing it saves and stops.
    pub memory_budget: u64,
    /// Distrust weighting of the loss (`--distrust`); None for plain training. Part of the
    /// checkpoint's configuration, so a resume with another α or λ is refused.
    pub distrust: Option<DistrustSettings>,
}

impl TrainConfig {
    /// Where the adapter, checkpoints and metrics go.
    pub fn output_dir(&self) -> &Path {
        self.output.output.as_deref().unwrap_or(Path::new("."))
    }

    /// The metrics file (`--metrics-file`, else `metrics.jsonl` in the output directory).
    pub fn metrics_file(&self) -> std::path::PathBuf {
        match &self.output.metrics_file {
            Some(p) => p.clone(),
            None => self.output_dir().join("metrics.jsonl"),
        }
    }

    /// Blocks that carry adapters (the last `num_layers`).
    pub fn num_layers(&self) -> usize {
        self.lora.num_layers.unwrap_or(0)
    }
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
