//! The frozen linear with its LoRA pair, `y = x Wᵀ (+ b) + s · (x' Aᵀ) Bᵀ`, forward and
//! backward (`x'` is the dropped-out input in training, else `x`; [`super::dropout`]).
//!
//! Frozen weights only ever see `dX = dY · W`; a pair gets `dA` and `dB`.

use super::dropout::dropout_mask;
use crate::model::llama::Linear;
use crate::model::lora::{Adapter, LoraPair, Target};
use candle_core::{Module, Result, Tensor};

impl Module for Linear {
    /// `y = x Wᵀ (+ b)` for `x` of any leading shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let in_features = out_dims.pop().unwrap_or(0);
        let rows: usize = out_dims.iter().product();
        let y = self.weight.matmul_t(&x.reshape((rows, in_features))?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        out_dims.push(self.out_features());
        y.reshape(out_dims)
    }
}

impl Linear {
    /// `y = x Wᵀ (+ b) + s · (x' Aᵀ) Bᵀ` for 2-D `x`, the LoRA term as two thin matmuls (never
    /// `W + BA`); `x'` is `lora_x` when given (the dropped-out input in training), else `x`.
    /// Also returns `x' Aᵀ`, which the backward needs for `dB`.
    pub fn forward_lora(
        &self,
        x: &Tensor,
        lora: Option<&LoraPair>,
        scale: f64,
        lora_x: Option<&Tensor>,
        decode: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        // Decoding: a weight times the few rows of new positions is read as stored
        // (`Weight::matmul_t_decode`): a quantized one from its blocks, never dequantized
        // whole; a bf16/f16 one never widened to an f32 copy.
        let decoding = decode && self.weight.reads_rows(x);
        if self.bias.is_none() && crate::kernels::covers(x) && !decoding {
            let w = self.weight.f32()?;
            if let Some(done) =
                crate::kernels::linear_forward(x, &w, lora.map(|p| (low_rank(p), scale)), lora_x)
            {
                return done;
            }
        }
        let y = if decoding {
            let y = self.weight.matmul_t_decode(x)?;
            match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        } else {
            self.forward(x)?
        };
        match lora {
            None => Ok((y, None)),
            Some(p) => {
                let xa = lora_x
                    .unwrap_or(x)
                    .to_dtype(p.a.dtype())?
                    .matmul(&p.a.t()?)?;
                let delta = (xa.matmul(&p.b.t()?)? * scale)?.to_dtype(y.dtype())?;
                Ok(((y + delta)?, Some(xa)))
            }
        }
    }
}

/// The LoRA side of one block's linears: the adapter whose pairs apply (none: the frozen
/// model) and, in training, dropout on the pairs' inputs `(probability, seed)`.
#[derive(Clone, Copy)]
pub struct Lora<'a> {
    pub adapter: Option<&'a Adapter>,
    pub layer: usize,
    pub dropout: Option<(f64, u64)>,
    /// Decoding (generation): quantized weights are read from their blocks with the input
    /// rounded to 8 bits, as llama.cpp does; training and scoring stay exact.
    pub decode: bool,
}

/// One projection's output, with what its backward needs.
#[derive(Clone)]
pub struct Projected {
    pub y: Tensor,
    /// `x' Aᵀ`, when the target has a pair.
    pub xa: Option<Tensor>,
    /// The dropped-out LoRA input `x'`, when dropout is on.
    pub dropped: Option<Tensor>,
}

/// A linear's forward input as its backward needs it: the input, the dropped-out LoRA input
/// (with dropout), `x' Aᵀ`, and the row the input starts at (for the dropout mask).
pub type LinearInput<'t> = (&'t Tensor, Option<&'t Tensor>, Option<&'t Tensor>, usize);

impl Lora<'_> {
    fn pair(&self, target: Target) -> Option<&LoraPair> {
        self.adapter.and_then(|a| a.get(self.layer, target))
    }

    fn scale(&self) -> f64 {
        self.adapter.map_or(0.0, |a| a.cfg.scale())
    }

    /// The dropped-out LoRA input of `target` for rows `row0..` of `input`, when the target
    /// has a pair and dropout is on.
    pub fn dropped(&self, target: Target, input: &Tensor, row0: usize) -> Result<Option<Tensor>> {
        match (self.pair(target), self.dropout) {
            (Some(_), Some((p, seed))) if p > 0.0 => {
                let (rows, cols) = input.dims2()?;
                let rows = row0..row0 + rows;
                let mask = dropout_mask(p, seed, self.layer, target, rows, cols, input)?;
                Ok(Some(input.broadcast_mul(&mask)?))
            }
            _ => Ok(None),
        }
    }

    /// `x' Aᵀ` of `target` for `x'` (the dropped-out input, or the input), when it has a pair:
    /// what the backward needs of a projection whose output it does not.
    pub fn xa(&self, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        match self.pair(target) {
            Some(p) => Ok(Some(x.to_dtype(p.a.dtype())?.matmul(&p.a.t()?)?)),
            None => Ok(None),
        }
    }

    /// The forward of `lin` (on `target`) on rows `row0..` of the block's rows.
    pub fn project(
        &self,
        lin: &Linear,
        target: Target,
        input: &Tensor,
        row0: usize,
    ) -> Result<Projected> {
        let dropped = self.dropped(target, input, row0)?;
        let (y, xa) = lin.forward_lora(
            input,
            self.pair(target),
            self.scale(),
            dropped.as_ref(),
            self.decode,
        )?;
        Ok(Projected { y, xa, dropped })
    }

    /// The backward of `lin` (on `target`): adds `∂/∂input` into `dx` (when given) and hands
    /// the pair's gradients `(dA, dB)` to `grads`.
    pub fn backward(
        &self,
        grads: &mut GradSink<'_>,
        lin: &Linear,
        target: Target,
        (input, lora_x, xa, row0): LinearInput<'_>,
        dy: &Tensor,
        mut dx: Option<&mut InputGrad>,
    ) -> Result<()> {
        let pair = self.pair(target);
        let scale = self.scale();
        // The fused path: no dropout (its mask would scale the LoRA part of dX alone).
        if lora_x.is_none()
            && crate::kernels::covers(dy)
            && !matches!(dx.as_deref(), Some(InputGrad::Tensor(_)))
        {
            let w = lin.weight.f32()?;
            let lora = match (pair, xa) {
                (Some(p), Some(xa)) => Some((low_rank(p), scale, input, xa)),
                _ => None,
            };
            let mut fresh = Vec::new();
            let is_fresh = !matches!(dx.as_deref(), Some(InputGrad::Buffer(_)));
            let buf = match dx.as_deref_mut() {
                Some(InputGrad::Buffer(v)) => Some(v),
                Some(_) => Some(&mut fresh),
                None => None,
            };
            if let Some(done) = crate::kernels::linear_backward(&w, dy, lora, buf) {
                if let Some(g) = done? {
                    grads(target, &g.da, &g.db)?;
                }
                if let (Some(slot), true) = (dx, is_fresh) {
                    *slot = InputGrad::Buffer(fresh);
                }
                return Ok(());
            }
        }
        let mut d = match dx {
            Some(_) => Some(lin.weight.matmul(dy)?),
            None => None,
        };
        if let (Some(p), Some(xa)) = (pair, xa) {
            let (da, db, dx_lora) =
                lora_backward(p, scale, lora_x.unwrap_or(input), xa, dy, d.is_some())?;
            // Through dropout: the same mask (x'/x is 0 or 1/(1-p)) scales the gradient.
            let dx_lora = match (dx_lora, lora_x, self.dropout) {
                (Some(d), Some(_), Some((prob, seed))) => {
                    let (rows, cols) = input.dims2()?;
                    let rows = row0..row0 + rows;
                    let mask = dropout_mask(prob, seed, self.layer, target, rows, cols, &d)?;
                    Some(d.broadcast_mul(&mask)?)
                }
                (d, _, _) => d,
            };
            grads(target, &da, &db)?;
            if let (Some(base), Some(extra)) = (d.take(), dx_lora) {
                d = Some((base + extra.to_dtype(dy.dtype())?)?);
            }
        }
        if let (Some(slot), Some(d)) = (dx, d) {
            slot.add(d)?;
        }
        Ok(())
    }
}

/// Where a block's backward hands each pair's gradients `(target, dA, dB)`.
pub type GradSink<'g> = dyn FnMut(Target, &Tensor, &Tensor) -> Result<()> + 'g;

/// For `y = s · (x Aᵀ) Bᵀ`: `(dA, dB, dX)` given `xa = x Aᵀ` and `dy`.
fn lora_backward(
    p: &LoraPair,
    scale: f64,
    x: &Tensor,
    xa: &Tensor,
    dy: &Tensor,
    want_dx: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let dt = p.a.dtype();
    let dy = dy.to_dtype(dt)?;
    let db = (dy.t()?.matmul(xa)? * scale)?;
    let dxa = (dy.matmul(&p.b)? * scale)?;
    let da = dxa.t()?.matmul(&x.to_dtype(dt)?)?;
    let dx = if want_dx {
        Some(dxa.matmul(&p.a)?)
    } else {
        None
    };
    Ok((da, db, dx))
}

/// An input gradient being summed over the linears that read the same input: a plain buffer
/// while the fused kernels fill it, a tensor otherwise.
pub enum InputGrad {
    /// Not wanted (the block below needs no gradient).
    Unused,
    Empty,
    Buffer(Vec<f32>),
    Tensor(Tensor),
}

impl InputGrad {
    /// An empty gradient when `wanted`, else [`InputGrad::Unused`].
    pub fn wanted(wanted: bool) -> Self {
        if wanted {
            InputGrad::Empty
        } else {
            InputGrad::Unused
        }
    }

    fn add(&mut self, d: Tensor) -> Result<()> {
        *self = match std::mem::replace(self, InputGrad::Unused) {
            InputGrad::Unused | InputGrad::Empty => InputGrad::Tensor(d),
            InputGrad::Tensor(t) => InputGrad::Tensor((t + d)?),
            InputGrad::Buffer(v) => {
                let t = Tensor::from_vec(v, d.dims(), d.device())?;
                InputGrad::Tensor((t + d)?)
            }
        };
        Ok(())
    }

    pub fn into_tensor(self, dims: &[usize]) -> Result<Tensor> {
        match self {
            InputGrad::Tensor(t) => Ok(t),
            InputGrad::Buffer(v) => Tensor::from_vec(v, dims, &candle_core::Device::Cpu),
            InputGrad::Unused | InputGrad::Empty => {
                candle_core::bail!("no layer produced this input gradient")
            }
        }
    }
}

/// A LoRA pair as the fused kernels take it.
fn low_rank(p: &LoraPair) -> crate::kernels::LowRank<'_> {
    crate::kernels::LowRank { a: &p.a, b: &p.b }
}
