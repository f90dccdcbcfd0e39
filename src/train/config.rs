//! The resolved training configuration: every setting the run uses, after defaults, the YAML
//! file and the command line are combined. Written beside the adapter as `train_config.json`.

use super::settings::{LoraArgs, MemoryArgs, ObjectiveArgs, OutputArgs, ScheduleArgs};
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
    pub objective: ObjectiveArgs,
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
    /// The engine that ran the steps (`--engine` resolved). Checkpoints of earlier versions
    /// lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::engine::choice::EngineChoice>,
    /// The dtype the frozen weights are held in (`--dtype` resolved: on the CPU auto keeps a
    /// bf16 checkpoint's bf16), so a resume holds them alike. Checkpoints of earlier versions
    /// lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_dtype: Option<String>,
    /// The model's files, sampled ([`super::checkpoint::model_fingerprint`]): a resume with
    /// other weights at the same path is refused. Checkpoints of earlier versions lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_fingerprint: Option<String>,
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
