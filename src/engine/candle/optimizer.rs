//! AdamW (decoupled weight decay, as PyTorch's) over the LoRA parameters, and global-norm
//! gradient clipping. Moments are f32 like the parameters.

use super::step::Grads;
use crate::engine::OptimizerState;
use crate::model::lora::Adapter;
use candle_core::{DType, Result, Tensor};

#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The moments and the updates applied so far (for bias correction).
    state: OptimizerState,
}

impl AdamW {
    pub fn new(adapter: &mut Adapter, weight_decay: f64) -> Result<Self> {
        // Zeros written out, not lazily mapped: the moments are resident from the start, so the
        // first step's memory is every later step's (lazy zero pages made step 2 grow by 8 bytes
        // per parameter over step 1).
        let zeros = |p: &mut Tensor| p.zeros_like()?.affine(1.0, 0.0);
        let m: Vec<Tensor> = adapter.tensors_mut().map(zeros).collect::<Result<_>>()?;
        let v: Vec<Tensor> = adapter.tensors_mut().map(zeros).collect::<Result<_>>()?;
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            state: OptimizerState { t: 0, m, v },
        })
    }

    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Continues from a saved state (a resumed or reloaded run).
    pub fn set_state(&mut self, state: OptimizerState) {
        self.state = state;
    }

    pub fn step(&mut self, adapter: &mut Adapter, grads: &Grads, lr: f64) -> Result<()> {
        let st = &mut self.state;
        st.t += 1;
        let bc1 = 1.0 - self.beta1.powi(st.t as i32);
        let bc2 = 1.0 - self.beta2.powi(st.t as i32);
        for (((p, g), m), v) in adapter
            .tensors_mut()
            .zip(grads.tensors())
            .zip(st.m.iter_mut())
            .zip(st.v.iter_mut())
        {
            *m = ((&*m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&*v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&*m / bc1)? / denom)?;
            let decayed = (&*p * (1.0 - lr * self.weight_decay))?;
            *p = (decayed - (update * lr)?)?;
        }
        Ok(())
    }
}

/// Global L2 norm of all gradients. Each tensor's sum of squares is taken on its device in f32
/// (Metal has no f64), and all of them are read back at once (one host sync, not one a
/// tensor), then added in f64.
pub fn grad_norm(grads: &Grads) -> Result<f64> {
    let sums = grads
        .tensors()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let sq: f64 = Tensor::stack(&sums, 0)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .sum();
    Ok(sq.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.tensors_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}
