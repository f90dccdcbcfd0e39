//! LoRA fine-tuning above the engine: the pre-flight plan and memory estimate, batching, the
//! schedule, checkpoints, metrics, progress, and the trainer that runs them over an engine.

pub mod checkpoint;
pub mod config;
pub mod estimate;
pub mod metrics;
pub mod plan;
pub mod progress;
pub mod schedule;
pub mod settings;
pub mod summary;
pub mod trainer;
