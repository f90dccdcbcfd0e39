//! MLX's failures: MLX reports them as exceptions with a message. A leaf, so that the crate's
//! error type can hold one without importing the engine (the conversions into the crate's
//! errors are in the engine's `mod.rs`).

/// An MLX operation failed; the message is MLX's.
#[derive(Debug, thiserror::Error)]
#[error("MLX: {0}")]
pub struct MlxError(pub String);

impl From<mlx_rs::error::Exception> for MlxError {
    fn from(e: mlx_rs::error::Exception) -> Self {
        MlxError(e.what().to_string())
    }
}
