//! The memory-flat step on MLX. Forward: embeddings, then each block without a graph, keeping
//! only the inputs of the adapted blocks. Head: the chunked LM head and cross-entropy, each
//! chunk differentiated on its own. Backward: from the top block down, each block recomputed
//! from its saved input and differentiated by MLX's autograd (a vector-Jacobian product with
//! respect to the block's input and its LoRA tensors only: frozen weights are never
//! differentiated). The step builds one lazy graph; the engine evaluates it once.

use super::batch::Layout;
use super::block;
use super::convert::scalar;
use super::head::{self, HEAD_CHUNK};
use super::params::{self, Params};
use super::weights::Model;
use crate::engine::LossSums;
use mlx_rs::error::Exception;
use mlx_rs::ops::zeros_dtype;
use mlx_rs::transforms::fallible_vjp;
use mlx_rs::{Array, Dtype};

type R<T> = Result<T, Exception>;

/// A micro-batch's step, not yet evaluated.
pub struct Pending {
    /// Σ cross-entropy over the scored rows (f32 scalar).
    pub ce: Array,
    /// Σ weight · cross-entropy.
    pub weighted: Array,
    /// Σ weight (known on the host).
    pub weight: f64,
    /// `loss_scale · ∂(Σ wᵢ·CEᵢ)/∂θ`, in adapter order.
    pub grads: Vec<Array>,
}

impl Pending {
    /// The arrays that one evaluation computes.
    pub fn outputs(&self) -> impl Iterator<Item = &Array> {
        [&self.ce, &self.weighted].into_iter().chain(&self.grads)
    }

    /// The loss sums, once evaluated.
    pub fn sums(&self) -> crate::error::Result<LossSums> {
        Ok(LossSums {
            ce: scalar(&self.ce)?,
            weighted: scalar(&self.weighted)?,
            weight: self.weight,
        })
    }
}

fn pairs_of(params: &Params, layer: usize) -> block::Pairs<'_> {
    let mut out: block::Pairs = Default::default();
    for (i, p) in params.pairs[layer].iter().enumerate() {
        out[i] = p.as_ref().map(|(a, b)| (a, b));
    }
    out
}

/// The step's graph for one micro-batch.
pub fn forward_backward(
    model: &Model,
    params: &Params,
    lay: &Layout,
    loss_scale: f64,
) -> R<Pending> {
    let layers = model.blocks.len();
    let lowest = params.lowest().min(layers);
    let scale = params.scale();
    let mut x = model.embed.take_axis(&lay.ids, 0)?;
    let mut inputs = Vec::with_capacity(layers - lowest);
    for l in 0..layers {
        if l >= lowest {
            inputs.push(x.clone());
        }
        x = block::forward(model, l, &x, &pairs_of(params, l), scale, lay)?;
    }

    // The head, chunk by chunk: ∂(loss_scale · Σ w·CE)/∂x summed over chunks.
    let mut dx = zeros_dtype(x.shape(), x.dtype())?;
    let mut ce_sum = Array::from_f32(0.0);
    let mut weighted = Array::from_f32(0.0);
    let n = lay.target_rows.len();
    let mut start = 0;
    while start < n {
        let len = HEAD_CHUNK.min(n - start);
        let rows = super::convert::indices(&lay.target_rows[start..start + len], &[len as i32]);
        let targets = super::convert::indices(&lay.target_ids[start..start + len], &[len as i32]);
        let w = &lay.target_weights[start..start + len];
        let coef: Vec<f32> = w.iter().map(|&w| (w as f64 * loss_scale) as f32).collect();
        let coef = Array::from_slice(&coef, &[len as i32]);
        let f = |args: &[Array]| -> R<Vec<Array>> {
            let ce = head::cross_entropy(model, &args[0], &rows, &targets)?;
            Ok(vec![ce.multiply(&coef)?.sum(None)?, ce])
        };
        let cotangents = [
            Array::from_f32(1.0),
            zeros_dtype(&[len as i32], Dtype::Float32)?,
        ];
        let (outs, grads) = fallible_vjp(f, &[x.clone()], &cotangents)?;
        dx = dx.add(grads[0].as_dtype(x.dtype())?)?;
        let ce = &outs[1];
        ce_sum = ce_sum.add(ce.sum(None)?)?;
        weighted = weighted.add(
            ce.multiply(Array::from_slice(w, &[len as i32]))?
                .sum(None)?,
        )?;
        start += len;
    }
    drop(x);

    // The blocks, top down, each recomputed from its input and differentiated.
    let mut block_grads: Vec<Vec<Array>> = vec![vec![]; layers];
    for l in (lowest..layers).rev() {
        let input = inputs
            .pop()
            .unwrap_or_else(|| unreachable!("one input per adapted block"));
        let present = params::present(params, l);
        let mut primals = vec![input];
        primals.extend(params.block_tensors(l));
        let f = |args: &[Array]| -> R<Vec<Array>> {
            let pairs = params::unflatten(&present, &args[1..]);
            Ok(vec![block::forward(
                model, l, &args[0], &pairs, scale, lay,
            )?])
        };
        let (_, mut grads) = fallible_vjp(f, &primals, std::slice::from_ref(&dx))?;
        let rest = grads.split_off(1);
        dx = grads.remove(0);
        block_grads[l] = rest;
    }
    Ok(Pending {
        ce: ce_sum,
        weighted,
        weight: lay.target_weights.iter().map(|&w| w as f64).sum(),
        grads: block_grads.into_iter().flatten().collect(),
    })
}
