//! MLX's failures as the crate's error: MLX reports them as exceptions with a message.

use crate::error::Error;

/// An MLX operation failed; the message is MLX's.
#[derive(Debug, thiserror::Error)]
#[error("MLX: {0}")]
pub struct MlxError(pub String);

impl From<mlx_rs::error::Exception> for MlxError {
    fn from(e: mlx_rs::error::Exception) -> Self {
        MlxError(e.what().to_string())
    }
}

impl From<mlx_rs::error::Exception> for Error {
    fn from(e: mlx_rs::error::Exception) -> Self {
        Error::Mlx(e.into())
    }
}

impl From<mlx_rs::error::Exception> for crate::engine::StepError {
    fn from(e: mlx_rs::error::Exception) -> Self {
        crate::engine::StepError::Failed(e.into())
    }
}
