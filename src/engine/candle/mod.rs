//! The candle engine: the training step on candle tensors (the block-wise loop over
//! [`crate::model::block`], whose ops run the fused CPU kernels where they apply and candle's
//! composite ops elsewhere), the micro-batch layout and the optimizer.

pub mod batch;
pub mod optimizer;
pub mod step;
