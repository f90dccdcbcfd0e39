//! The candle engine: the training step on candle tensors, with the fused CPU kernels where
//! they apply and candle's composite ops elsewhere (other devices and dtypes).

pub mod attention;
pub mod batch;
pub mod optimizer;
pub mod step;
