//! The MLX engine: the training step on MLX arrays through mlx-rs (Metal on Apple silicon; on
//! Linux MLX's CPU backend from the mlx-cpu wheel, which is what the tests here run on). MLX's
//! memory figures and limits are read and set through the run's meter
//! ([`crate::runtime::memory::mlx`]).
//!
//! Built only with the `mlx` feature.

pub mod error;

#[cfg(test)]
mod checks;

pub use error::MlxError;
