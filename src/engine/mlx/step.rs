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
use super::order;
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
    let (x, inputs) = forward(model, Some(params), lay)?;
    let coef: Vec<f32> = lay
        .target_weights
        .iter()
        .map(|&w| (w as f64 * loss_scale) as f32)
        .collect();
    let (dx, ce, weighted) = head_backward(model, &x, lay, &coef)?;
    drop(x);
    Ok(Pending {
        ce,
        weighted,
        weight: lay.target_weights.iter().map(|&w| w as f64).sum(),
        grads: backward(model, params, lay, inputs, dx)?,
    })
}

/// The forward without a graph under `params` (None: the adapter off): the top hidden states
/// and the input of each adapted block (none without `params`).
pub fn forward(model: &Model, params: Option<&Params>, lay: &Layout) -> R<(Array, Vec<Array>)> {
    let layers = model.blocks.len();
    let lowest = params.map_or(layers, |p| p.lowest().min(layers));
    let scale = params.map_or(0.0, Params::scale);
    let mut x = model.embed.take_axis(&lay.ids, 0)?;
    let mut inputs = Vec::with_capacity(layers - lowest);
    for l in 0..layers {
        if l >= lowest {
            inputs.push(x.clone());
        }
        let pairs = params.map_or_else(Default::default, |p| pairs_of(p, l));
        x = block::forward(model, l, &x, &pairs, scale, lay)?;
    }
    Ok((x, inputs))
}

/// Each scored row's cross-entropy (f32 `[n]`, in `lay.target_rows` order) from the top hidden
/// states `x`, chunk by chunk, without a graph.
pub fn row_ce(model: &Model, x: &Array, lay: &Layout) -> R<Array> {
    let mut parts: Vec<Array> = vec![];
    for (rows, targets, _, _) in chunks(lay) {
        // One chunk's logits at a time (see `order`).
        let x = order::after(x, &parts.last().into_iter().collect::<Vec<_>>())?;
        parts.push(head::cross_entropy(model, &x, &rows, &targets)?);
    }
    if parts.is_empty() {
        return zeros_dtype(&[0], Dtype::Float32);
    }
    mlx_rs::ops::concatenate(&parts, 0)
}

/// The scored rows of `lay` in head chunks: `(rows, targets, start, len)`.
fn chunks(lay: &Layout) -> impl Iterator<Item = (Array, Array, usize, usize)> + '_ {
    let n = lay.target_rows.len();
    (0..n).step_by(HEAD_CHUNK).map(move |start| {
        let len = HEAD_CHUNK.min(n - start);
        let at = |v: &[u32]| super::convert::indices(&v[start..start + len], &[len as i32]);
        (at(&lay.target_rows), at(&lay.target_ids), start, len)
    })
}

/// The head, chunk by chunk: `∂(Σ coefᵢ·CEᵢ)/∂x` summed over chunks (`coef`: one per scored
/// row), with Σ CE and Σ w·CE (w: the layout's weights).
pub fn head_backward(
    model: &Model,
    x: &Array,
    lay: &Layout,
    coef: &[f32],
) -> R<(Array, Array, Array)> {
    let mut dx = zeros_dtype(x.shape(), x.dtype())?;
    let mut ce_sum = Array::from_f32(0.0);
    let mut weighted = Array::from_f32(0.0);
    for (k, (rows, targets, start, len)) in chunks(lay).enumerate() {
        // Each chunk starts once the one before is differentiated and its loss summed (the
        // loss's gather holds the logits until then), so one chunk's logits are alive at a
        // time (see `order`).
        let x = match k {
            0 => x.clone(),
            _ => order::after(x, &[&dx, &ce_sum])?,
        };
        let w = &lay.target_weights[start..start + len];
        let c = Array::from_slice(&coef[start..start + len], &[len as i32]);
        let (grad, ce) = head::chunk_gradient(model, &x, &rows, &targets, &c)?;
        dx = dx.add(grad.as_dtype(x.dtype())?)?;
        let ce = &ce;
        ce_sum = ce_sum.add(ce.sum(None)?)?;
        weighted = weighted.add(
            ce.multiply(Array::from_slice(w, &[len as i32]))?
                .sum(None)?,
        )?;
    }
    Ok((dx, ce_sum, weighted))
}

/// The blocks' backward from `dx` at the top, top down, each block recomputed from its saved
/// input (`inputs`, from [`forward`]) and differentiated: the LoRA gradients in adapter order.
pub fn backward(
    model: &Model,
    params: &Params,
    lay: &Layout,
    mut inputs: Vec<Array>,
    mut dx: Array,
) -> R<Vec<Array>> {
    let layers = model.blocks.len();
    let lowest = params.lowest().min(layers);
    let scale = params.scale();
    let mut block_grads: Vec<Vec<Array>> = vec![vec![]; layers];
    for l in (lowest..layers).rev() {
        let input = inputs
            .pop()
            .unwrap_or_else(|| unreachable!("one input per adapted block"));
        let present = params::present(params, l);
        // The recompute waits for the gradient from above, so one block's activations are
        // alive at a time (see `order`).
        let mut primals = vec![order::after(&input, &[&dx])?];
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
    Ok(block_grads.into_iter().flatten().collect())
}
