//! The seam between the trainer and the arrays.

pub mod candle;
