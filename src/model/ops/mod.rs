//! The transformer's operations, one file each, with the forward and the backward side by side
//! (llm.c style): RMSNorm, RoPE, attention, SwiGLU, the LoRA linear, the LM head with its loss,
//! and the attention mask.
//!
//! Each op runs the fused CPU kernels of [`crate::kernels`] where they cover its inputs (a
//! kernel returns `None` otherwise) and candle's composite ops elsewhere (other devices and
//! dtypes); the composite ops are the oracle the tests hold the kernels to. The block
//! (`model/block.rs`) is written once on top of these.

pub mod attention;
pub mod dropout;
pub mod head;
pub mod linear;
pub mod mask;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

pub use crate::kernels::Heads;
use candle_core::{Result, Tensor};

/// Row ranges `(start, len)` of `rows` rows in chunks of `chunk` (the last one shorter).
pub fn row_chunks(rows: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..rows)
        .step_by(chunk)
        .map(move |r0| (r0, chunk.min(rows - r0)))
}

/// Row chunks back into one tensor (one chunk is returned as it is).
pub fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Tensor::cat(&parts, 0)
}

/// `[B·T, n·d]` (the projections' layout) as `[B, n, T, d]` (one head per matrix).
pub fn to_heads(x: &Tensor, h: Heads, n: usize) -> Result<Tensor> {
    x.reshape((h.b, h.t, n, h.d))?.transpose(1, 2)?.contiguous()
}

/// `[B, n, T, d]` back to `[B·T, n·d]`.
pub fn from_heads(x: &Tensor, h: Heads, n: usize) -> Result<Tensor> {
    x.transpose(1, 2)?.reshape((h.b * h.t, n * h.d))
}

#[cfg(test)]
mod tests {
    use super::row_chunks;

    #[test]
    fn row_chunks_cover_the_rows_in_order() {
        for (rows, chunk) in [(10, 3), (9, 3), (1, 5), (4, usize::MAX)] {
            let parts: Vec<_> = row_chunks(rows, chunk).collect();
            assert_eq!(parts.iter().map(|p| p.1).sum::<usize>(), rows);
            assert!(parts.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        }
        assert_eq!(row_chunks(0, 4).count(), 0);
    }
}
