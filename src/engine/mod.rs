//! The seam between the trainer and the arrays.

pub mod candle;

/// Why a step did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The memory meter crossed its limit between two blocks: the step was abandoned, and the
    /// adapter and optimizer are still those of the step before.
    #[error("memory budget crossed: peak {peak} bytes")]
    OverBudget { peak: u64 },
    #[error(transparent)]
    Failed(#[from] crate::error::Error),
}

impl From<::candle_core::Error> for StepError {
    fn from(e: ::candle_core::Error) -> Self {
        StepError::Failed(e.into())
    }
}
