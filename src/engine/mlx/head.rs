//! The final RMSNorm, the LM head and cross-entropy, on chunks of scored rows: the `[chunk,
//! vocab]` logits are the largest thing the head holds, never `[B·T, vocab]`. Logits and the
//! loss are in f32 whatever the model's dtype. The gradient of a chunk is written out rather
//! than left to autograd: `∂CE/∂logits = softmax − onehot`, and the one-hot part times the head
//! is a gather of the targets' head rows, so no `[chunk, vocab]` one-hot or scatter is made
//! (autograd's made three more vocabulary-wide arrays a chunk).

use super::weights::Model;
use mlx_rs::error::Exception;
use mlx_rs::fast::rms_norm;
use mlx_rs::transforms::fallible_vjp;
use mlx_rs::{Array, Dtype};

type R<T> = Result<T, Exception>;

/// Scored rows per head chunk (as the candle engine's).
pub const HEAD_CHUNK: usize = 256;

/// Scored rows per head chunk in the step: [`HEAD_CHUNK`], or `YOUR_AI_MLX_HEAD_CHUNK` (read
/// once), a diagnostic for measuring on a GPU what fewer, larger chunks save in kernels against
/// the memory their logits take (SmolLM2's step at 2048 tokens on MLX's CPU backend: 5,060
/// nodes in chunks of 256, 4,736 in chunks of 1,024); the memory estimate assumes
/// [`HEAD_CHUNK`].
pub fn chunk_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| match std::env::var("YOUR_AI_MLX_HEAD_CHUNK") {
        Err(_) => HEAD_CHUNK,
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("YOUR_AI_MLX_HEAD_CHUNK={v:?} is not a row count; using {HEAD_CHUNK}");
                HEAD_CHUNK
            }
        },
    })
}

/// The final norm of `rows` of `x` (`[B·T, hidden]`).
fn normed(model: &Model, x: &Array, rows: &Array) -> R<Array> {
    rms_norm(
        x.take_axis(rows, 0)?,
        Some(&model.norm),
        model.cfg.rms_norm_eps as f32,
    )
}

/// Logits (f32) of normed rows `h`, their log-sum-exp, and each row's cross-entropy against
/// `targets`.
fn logits_and_ce(model: &Model, h: &Array, targets: &Array) -> R<(Array, Array, Array)> {
    let logits = h.matmul(model.head.t())?.as_dtype(Dtype::Float32)?;
    let lse = logits.logsumexp_axis(-1, false)?;
    let n = targets.shape()[0];
    let picked = logits
        .take_along_axis(targets.reshape(&[n, 1])?, -1)?
        .reshape(&[n])?;
    let ce = lse.subtract(&picked)?;
    Ok((logits, lse, ce))
}

/// Cross-entropy of each of `rows` of `x` (`[B·T, hidden]`, final hidden states before the
/// norm) against `targets`, in f32: `[rows]`.
pub fn cross_entropy(model: &Model, x: &Array, rows: &Array, targets: &Array) -> R<Array> {
    Ok(logits_and_ce(model, &normed(model, x, rows)?, targets)?.2)
}

/// One chunk's cross-entropy (`[rows]`, f32) and `∂(Σ cᵢ·CEᵢ)/∂x` (`[B·T, hidden]`, zero
/// outside `rows`, f32 or the model's dtype).
pub fn chunk_gradient(
    model: &Model,
    x: &Array,
    rows: &Array,
    targets: &Array,
    c: &Array,
) -> R<(Array, Array)> {
    let h = normed(model, x, rows)?;
    let (logits, lse, ce) = logits_and_ce(model, &h, targets)?;
    let c_col = c.expand_dims(-1)?;
    // c·softmax, then the head: the vocabulary-wide part of ∂/∂h.
    let p = logits
        .subtract(lse.expand_dims(-1)?)?
        .exp()?
        .multiply(&c_col)?
        .as_dtype(model.dtype)?;
    let picked_rows = model.head.take_axis(targets, 0)?;
    let dh = p.matmul(&model.head)?.subtract(
        picked_rows
            .as_dtype(Dtype::Float32)?
            .multiply(&c_col)?
            .as_dtype(model.dtype)?,
    )?;
    // Through the norm and the row selection by autograd (both `[rows, hidden]`).
    let f = |args: &[Array]| -> R<Vec<Array>> { Ok(vec![normed(model, &args[0], rows)?]) };
    let (_, grads) = fallible_vjp(f, std::slice::from_ref(x), std::slice::from_ref(&dh))?;
    let dx = grads
        .into_iter()
        .next()
        .ok_or_else(|| Exception::custom("the head's gradient is missing"))?;
    Ok((dx, ce))
}
