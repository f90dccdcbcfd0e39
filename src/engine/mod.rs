//! The seam between the trainer and the arrays. The trainer (data, batching, schedule,
//! checkpoints, metrics, progress, budget) is shared by every engine; an engine does the
//! arithmetic: forward and backward of a micro-batch, the optimizer update, evaluation, and
//! the reading of its memory. Adapter tensors and optimizer moments cross the seam as host
//! arrays (f32 tensors on the CPU), so checkpoints and PEFT files are written once, above it.
//!
//! [`candle`] is the CPU engine (candle tensors and the fused kernels); [`mlx`] (the `mlx`
//! feature) the MLX engine, for Apple silicon.

pub mod candle;
pub mod choice;
#[cfg(feature = "mlx")]
pub mod mlx;
pub mod objective;

pub use self::candle::step::{LossSums, Profile};

use crate::data::batch::Row;
use crate::data::preference::Pair;
use crate::data::Sample;
use crate::error::Result;
use crate::infer::eval::EvalResult;
use crate::model::lora::Adapter;
use crate::model::ModelConfig;
use crate::runtime::memory::Meter;
use objective::{Method, PreferenceLoss, PreferenceSums};

/// Why a step did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The memory meter crossed its limit between two blocks: the step was abandoned, and the
    /// adapter and optimizer are still those of the step before.
    #[error("memory budget crossed: peak {peak} bytes")]
    OverBudget { peak: u64 },
    /// A stop signal came: the step was abandoned between two blocks.
    #[error("stopped by signal {signal}")]
    Stopped { signal: i32 },
    #[error(transparent)]
    Failed(#[from] crate::error::Error),
}

impl From<::candle_core::Error> for StepError {
    fn from(e: ::candle_core::Error) -> Self {
        StepError::Failed(e.into())
    }
}

/// AdamW's moments, one tensor per adapter tensor (A then B of each pair, in adapter order),
/// and the number of updates applied so far.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub t: u64,
    pub m: Vec<::candle_core::Tensor>,
    pub v: Vec<::candle_core::Tensor>,
}

/// One micro-batch as the trainer hands it to an engine.
pub struct MicroBatchRows<'a> {
    pub rows: &'a [Row],
    /// LoRA dropout: probability and the seed its masks derive from.
    pub dropout: Option<(f64, u64)>,
    /// The micro-batch's share of the loss: 1 / (Σ weight over the accumulated batch).
    pub loss_scale: f64,
}

/// What the trainer asks of the arrays underneath it.
pub trait Engine {
    /// The model's shape (for adapter initialisation and messages).
    fn config(&self) -> &ModelConfig;

    /// Forward and backward of one micro-batch: adds `loss_scale · ∂(Σ wᵢ·CEᵢ)/∂θ` into the
    /// accumulated gradients and returns the batch's loss sums.
    fn accumulate(
        &mut self,
        batch: &MicroBatchRows,
        profile: &mut Profile,
    ) -> std::result::Result<LossSums, StepError>;

    /// Forward and backward of one micro-batch of preference pairs (rows: chosen, rejected,
    /// pair after pair) under `loss`, added into the accumulated gradients; returns the pairs'
    /// sums.
    fn accumulate_pairs(
        &mut self,
        batch: &MicroBatchRows,
        loss: &PreferenceLoss,
        profile: &mut Profile,
    ) -> std::result::Result<PreferenceSums, StepError>;

    /// The preference sums of `pairs` under `method` with the adapter applied (DPO's
    /// reference: the adapter off).
    fn evaluate_pairs(
        &self,
        pairs: &[Pair],
        batch_size: usize,
        method: Method,
        beta: f64,
    ) -> Result<PreferenceSums>;

    /// The accumulated gradients' global L2 norm, after scaling them down to `max_norm` when
    /// they exceed it (0: no clipping); the norm before clipping is returned.
    fn clip_gradients(&mut self, max_norm: f64) -> Result<f64>;

    /// One AdamW update at learning rate `lr` from the accumulated gradients, which it clears.
    fn update(&mut self, lr: f64) -> Result<()>;

    /// Drops the accumulated gradients without an update (a skipped step).
    fn discard_gradients(&mut self);

    /// The adapter as it is now, on the host.
    fn adapter(&self) -> Result<Adapter>;

    /// The optimizer's state, on the host.
    fn optimizer_state(&self) -> Result<OptimizerState>;

    /// Takes `adapter` as the one being trained, with the optimizer state `optimizer` (None: a
    /// fresh optimizer, its moments zero).
    fn set_adapter(&mut self, adapter: Adapter, optimizer: Option<OptimizerState>) -> Result<()>;

    /// Mean cross-entropy over the scored tokens of `samples`, with the adapter applied.
    fn evaluate(&self, samples: &[Sample], batch_size: usize) -> Result<EvalResult>;

    /// Drops the frozen weights, the adapter and the optimizer (everything goes before anything
    /// comes back), then loads the weights again exactly as the first time; the adapter and
    /// optimizer come back through [`Engine::set_adapter`].
    fn reload(&mut self) -> Result<()>;

    /// The memory meter the engine's work is measured by.
    fn meter(&self) -> &Meter;
}
