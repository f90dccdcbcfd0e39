//! The MLP's activation `silu(gate) · up` and its backward.

use candle_core::{Result, Tensor};

/// `silu(gate) · up`: the fused kernel where it applies, else the composite ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match crate::kernels::swiglu(gate, up) {
        Some(done) => done,
        None => candle_nn::ops::silu(gate)? * up,
    }
}

/// Gradients `(dgate, dup)` of `silu(gate) · up` given `dact`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dact: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(done) = crate::kernels::swiglu_backward(gate, up, dact) {
        return done;
    }
    let sig = candle_nn::ops::sigmoid(gate)?;
    // silu'(g) = σ(g) · (1 + g · (1 − σ(g)))
    let dsilu = (&sig * ((gate * (1.0 - &sig)?)? + 1.0)?)?;
    let dgate = ((dact * up)? * dsilu)?;
    let dup = (dact * (gate * &sig)?)?;
    Ok((dgate, dup))
}
