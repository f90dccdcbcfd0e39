//! RMSNorm over the last dimension, `y = x · rsqrt(mean(x²) + ε) · w`, and its backward.

use candle_core::{DType, Result, Tensor, D};

/// The forward: candle's fused kernel, or the composite form for f64 (which the kernel lacks
/// and the gradient tests use).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
            .sqrt()?
            .recip()?;
        return x.broadcast_mul(&r)?.broadcast_mul(w);
    }
    candle_nn::ops::rms_norm(x, w, eps)
}

/// `∂loss/∂x` given `dy`.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    match crate::kernels::rms_norm_backward(x, w, dy, eps, None) {
        Some(done) => done,
        None => composite_backward(x, w, dy, eps),
    }
}

/// `residual + rms_norm_backward(x, w, dy)` (a block's residual gradient passes around the
/// norm), in one pass where the kernel covers it.
pub fn rms_norm_backward_add(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<Tensor> {
    match crate::kernels::rms_norm_backward(x, w, dy, eps, Some(residual)) {
        Some(done) => done,
        None => residual + composite_backward(x, w, dy, eps)?,
    }
}

fn composite_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    let g = dy.broadcast_mul(w)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let gx = (&g * x)?.mean_keepdim(D::Minus1)?;
    let r3 = r.powf(3.0)?;
    g.broadcast_mul(&r)? - x.broadcast_mul(&(r3 * gx)?)?
}
