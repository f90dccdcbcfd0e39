//! AdamW (decoupled weight decay, as PyTorch's and the candle engine's) and global-norm clipping
//! on MLX arrays, f32. The same formulas, in the same order, as the candle engine's optimizer.

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

type R<T> = Result<T, Exception>;

fn s(v: f64) -> Array {
    Array::from_f32(v as f32)
}

/// The moments, in adapter order, and the updates applied so far.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub t: u64,
    pub m: Vec<Array>,
    pub v: Vec<Array>,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &[Array], weight_decay: f64) -> R<Self> {
        let zeros = |p: &Array| mlx_rs::ops::zeros_dtype(p.shape(), Dtype::Float32);
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: params.iter().map(zeros).collect::<R<_>>()?,
            v: params.iter().map(zeros).collect::<R<_>>()?,
        })
    }

    /// One update of `params` from `grads` at learning rate `lr`; returns the new parameters
    /// (lazy: the engine evaluates them with the moments).
    pub fn step(&mut self, params: &[Array], grads: &[Array], lr: f64) -> R<Vec<Array>> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let mut out = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let m = self.m[i]
                .multiply(s(self.beta1))?
                .add(g.multiply(s(1.0 - self.beta1))?)?;
            let v = self.v[i]
                .multiply(s(self.beta2))?
                .add(g.square()?.multiply(s(1.0 - self.beta2))?)?;
            let denom = v.divide(s(bc2))?.sqrt()?.add(s(self.eps))?;
            let update = m.divide(s(bc1))?.divide(&denom)?;
            let decayed = p.multiply(s(1.0 - lr * self.weight_decay))?;
            out.push(decayed.subtract(update.multiply(s(lr))?)?);
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(out)
    }
}

/// The global L2 norm of `grads` (an f32 scalar array, not yet evaluated).
pub fn global_norm(grads: &[Array]) -> R<Array> {
    let mut sq = Array::from_f32(0.0);
    for g in grads {
        sq = sq.add(g.square()?.sum(None)?)?;
    }
    sq.sqrt()
}

/// `grads` scaled down to a global norm of `max_norm` when `norm` exceeds it (0: no clipping).
pub fn clip(grads: Vec<Array>, norm: f64, max_norm: f64) -> R<Vec<Array>> {
    if !(max_norm > 0.0 && norm > max_norm) {
        return Ok(grads);
    }
    let k = s(max_norm / (norm + 1e-6));
    grads.iter().map(|g| g.multiply(&k)).collect()
}
