//! AdamW (decoupled weight decay, as PyTorch's and the candle engine's) and global-norm clipping
//! on MLX arrays, f32. The same formulas, in the same order, as the candle engine's optimizer.
//!
//! The adapter, its gradients and the moments are each held in two vectors (the banks of
//! [`super::params::Params`]), and the update is one compiled function a bank (MLX fuses its
//! element-wise ops: three kernels on CUDA). Written op by op it was about thirteen kernels a
//! tensor, and compiled but a tensor at a time three: 1,500 and then 340 small kernels a step
//! for an eight-block model on an H200, four times that at 32 blocks, each built by the host.

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

type R<T> = Result<T, Exception>;

fn s(v: f64) -> Array {
    Array::from_f32(v as f32)
}

/// One tensor's update: `[p, g, m, v, k, β1, 1−β1, β2, 1−β2, bc1, bc2, ε, lr, 1−lr·wd]` →
/// `[p', m', v']`, with the gradient `g·k` (`k`: the clipping factor, 1 without). Every scalar
/// is an input, so one trace serves every step, tensor shape (shapeless) and run.
fn update(a: &[Array]) -> R<Vec<Array>> {
    let [p, g, m, v, k, b1, nb1, b2, nb2, bc1, bc2, eps, lr, decay] = a else {
        return Err(Exception::custom("AdamW's update takes fourteen arrays"));
    };
    let g = g.multiply(k)?;
    let m = m.multiply(b1)?.add(g.multiply(nb1)?)?;
    let v = v.multiply(b2)?.add(g.square()?.multiply(nb2)?)?;
    let denom = v.divide(bc2)?.sqrt()?.add(eps)?;
    let step = m.divide(bc1)?.divide(&denom)?;
    let p = p.multiply(decay)?.subtract(step.multiply(lr)?)?;
    Ok(vec![p, m, v])
}

type Compiled = Box<dyn FnMut(&[Array]) -> R<Vec<Array>>>;

/// The moments (a vector a bank), and the updates applied so far.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub t: u64,
    pub m: Vec<Array>,
    pub v: Vec<Array>,
    update: Compiled,
}

impl AdamW {
    /// Zero moments for banks of `sizes` values.
    pub fn new(sizes: &[usize], weight_decay: f64) -> R<Self> {
        let zeros = |&n: &usize| {
            let n = i32::try_from(n)
                .map_err(|_| Exception::custom(format!("{n} LoRA values: too many for MLX")))?;
            mlx_rs::ops::zeros_dtype(&[n], Dtype::Float32)
        };
        let mut compiled = mlx_rs::transforms::compile::compile(update, true);
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: sizes.iter().map(zeros).collect::<R<_>>()?,
            v: sizes.iter().map(zeros).collect::<R<_>>()?,
            update: Box::new(move |a: &[Array]| compiled(a)),
        })
    }

    /// One update of the banks `params` from `grads` (a bank each) scaled by `k` (the
    /// clipping factor) at learning rate `lr`; returns the new banks (lazy: the engine
    /// evaluates them with the moments).
    pub fn step(&mut self, params: &[Array], grads: &[Array], k: f64, lr: f64) -> R<Vec<Array>> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let scalars = [
            k,
            self.beta1,
            1.0 - self.beta1,
            self.beta2,
            1.0 - self.beta2,
            bc1,
            bc2,
            self.eps,
            lr,
            1.0 - lr * self.weight_decay,
        ]
        .map(s);
        let mut out = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let mut args = vec![p.clone(), g.clone(), self.m[i].clone(), self.v[i].clone()];
            args.extend(scalars.iter().cloned());
            let mut new = (self.update)(&args)?.into_iter();
            let (Some(p), Some(m), Some(v)) = (new.next(), new.next(), new.next()) else {
                return Err(Exception::custom("AdamW's update returned too few arrays"));
            };
            out.push(p);
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(out)
    }
}

/// The global L2 norm of `grads` (its banks; an f32 scalar array, not yet evaluated).
pub fn global_norm(grads: &[Array]) -> R<Array> {
    let mut sum = Array::from_f32(0.0);
    for g in grads {
        sum = sum.add(g.square()?.sum(None)?)?;
    }
    sum.sqrt()
}

/// The factor that scales gradients of global norm `norm` down to `max_norm` when it exceeds
/// it (0: no clipping), else 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}
