//! LoRA fine-tuning: the block-wise step, its optimizer and schedule, batching, and the loop
//! that runs them with evaluation, saving and progress.

mod attention;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod estimate;
pub mod optimizer;
pub mod progress;
pub mod schedule;
pub mod step;
pub mod trainer;
