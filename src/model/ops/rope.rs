//! Rotary position embedding applied to queries and keys, and its backward (a rotation by the
//! opposite angle). The cos/sin tables come from [`crate::model::rope`].

use super::{from_heads, to_heads, Heads};
use candle_core::{Result, Tensor};

/// RoPE on `x` in the projections' `[B·T, n·d]` layout (training), or its inverse: the fused
/// kernel on that layout where it applies, else candle's op on the heads layout.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    h: Heads,
    n: usize,
    inverse: bool,
) -> Result<Tensor> {
    if let Some(done) = crate::kernels::rope(x, cos, sin, h.t, h.d, inverse) {
        return done;
    }
    from_heads(&rope_heads(&to_heads(x, h, n)?, cos, sin, inverse)?, h, n)
}

/// RoPE on `[B, n, T, d]` with candle's fused op (inference, and training's composite path);
/// `inverse` rotates by the opposite angle.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    if inverse {
        return candle_nn::rotary_emb::rope(x, cos, &sin.neg()?);
    }
    candle_nn::rotary_emb::rope(x, cos, sin)
}
