//! The final RMSNorm, the LM head and cross-entropy, on chunks of scored rows: the `[chunk,
//! vocab]` logits are the largest thing the head holds, never `[B·T, vocab]`. Logits and the
//! loss are in f32 whatever the model's dtype.

use super::weights::Model;
use mlx_rs::error::Exception;
use mlx_rs::fast::rms_norm;
use mlx_rs::{Array, Dtype};

type R<T> = Result<T, Exception>;

/// Scored rows per head chunk (as the candle engine's).
pub const HEAD_CHUNK: usize = 256;

/// Cross-entropy of each of `rows` of `x` (`[B·T, hidden]`, final hidden states before the
/// norm) against `targets`, in f32: `[rows]`.
pub fn cross_entropy(model: &Model, x: &Array, rows: &Array, targets: &Array) -> R<Array> {
    let h = rms_norm(
        x.take_axis(rows, 0)?,
        Some(&model.norm),
        model.cfg.rms_norm_eps as f32,
    )?;
    let logits = h.matmul(model.head.t())?.as_dtype(Dtype::Float32)?;
    let lse = logits.logsumexp_axis(-1, false)?;
    let n = targets.shape()[0];
    let picked = logits
        .take_along_axis(targets.reshape(&[n, 1])?, -1)?
        .reshape(&[n])?;
    lse.subtract(&picked)
}
