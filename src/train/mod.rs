//! LoRA fine-tuning: the block-wise step, its optimizer and schedule, batching, and the loop
//! that runs them with evaluation, saving and progress.

pub mod batch;
pub mod optimizer;
pub mod schedule;
pub mod step;
