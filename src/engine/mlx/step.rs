//! The memory-flat step on MLX. Forward: embeddings, then each block without a graph, keeping
//! only the inputs of the adapted blocks, and in the top `keep` of them the products of their
//! frozen linears too. Head: the chunked LM head and cross-entropy, each chunk differentiated
//! on its own. Backward: from the top block down, each block recomputed from its saved input
//! and differentiated by MLX's autograd (a vector-Jacobian product with respect to the block's
//! input and its LoRA tensors only: frozen weights are never differentiated). A block that kept
//! its frozen products takes them instead of recomputing them ([`super::kept`]): what it
//! recomputes is then the cheap part, the norms, RoPE, attention, SwiGLU and LoRA.
//!
//! The graph is evaluated a block (or a head chunk) at a time, so one or two blocks' working sets
//! are alive at once. One evaluation of the whole step, the first design, measured flat on MLX's
//! CPU backend but not on its CUDA backend: an 8B step on an H200 peaked at 31.7 GB against an
//! estimated 23.9, the same with every block recomputed, as if nearly every intermediate of the
//! step were held at once (likely because a GPU backend allocates an op's output when it queues the
//! op, and can free a buffer only once the GPU has run what reads it); block by block it peaked at
//! 19.9 GB. Waiting for each block left the GPU idle while the host built the next block's graph:
//! an eight-block 8B-shaped step took 0.131 s at 2048 tokens and 0.066 s at 512, much of it the GPU
//! waiting for the host. So each block is queued when built and the one before it waited for
//! ([`Evaluation::Pipelined`]): 0.107 s and 0.043 s, for one more block's work held (2.2 GB at 2048
//! tokens there). It also makes the phase times of `--profile` real.

use super::batch::Layout;
use super::block::{self, Products};
use super::convert::scalar;
use super::head;
use super::lowered::{BlockLora, Lowered};
use super::params::{Banks, Params};
use super::weights::Model;
use crate::engine::LossSums;
use crate::engine::Profile;
use mlx_rs::error::Exception;
use mlx_rs::ops::zeros_dtype;
use mlx_rs::{Array, Dtype};

type R<T> = Result<T, Exception>;

/// When the step's parts are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evaluation {
    /// As they are built: a block (or a head chunk) at a time (see the module's note).
    BlockByBlock,
    /// A block at a time too, but the host builds the next block's graph while the device
    /// computes the one before: each part is queued when built, and the part before it waited
    /// for, so at most two are in flight.
    Pipelined,
    /// Never here: the caller gets the whole step as one lazy graph, to inspect it.
    Deferred,
}

impl Evaluation {
    /// The engine's: [`Evaluation::Pipelined`], or [`Evaluation::BlockByBlock`] where
    /// `YOUR_AI_MLX_EVAL=block` (a diagnostic switch: it holds one block's work fewer on a GPU,
    /// and is slower).
    pub fn standard() -> Self {
        // Read once: every step and evaluation asks.
        static CHOSEN: std::sync::OnceLock<Evaluation> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| match std::env::var("YOUR_AI_MLX_EVAL").as_deref() {
            Ok("block") => Evaluation::BlockByBlock,
            _ => Evaluation::Pipelined,
        })
    }
}

/// Computes a phase's parts as [`Evaluation`] says.
struct Settler {
    mode: Evaluation,
    /// Under [`Evaluation::Pipelined`], the part queued last.
    queued: Vec<Array>,
}

impl Settler {
    fn new(mode: Evaluation) -> Self {
        Settler {
            mode,
            queued: vec![],
        }
    }

    /// `arrays`, the part just built: computed now, queued, or left in the graph.
    fn settle<'a>(&mut self, arrays: impl IntoIterator<Item = &'a Array>) -> R<()> {
        match self.mode {
            Evaluation::BlockByBlock => mlx_rs::transforms::eval(arrays),
            Evaluation::Pipelined => {
                let now: Vec<Array> = arrays.into_iter().cloned().collect();
                mlx_rs::transforms::async_eval(&now)?;
                let before = std::mem::replace(&mut self.queued, now);
                mlx_rs::transforms::eval(&before)
            }
            Evaluation::Deferred => Ok(()),
        }
    }

    /// Waits for what is still queued: a phase returns its parts computed.
    fn finish(self) -> R<()> {
        mlx_rs::transforms::eval(&self.queued)
    }
}

/// A micro-batch's step: its loss sums and gradients (computed, or under
/// [`Evaluation::Deferred`] one lazy graph).
pub struct Pending {
    /// Σ cross-entropy over the scored rows (f32 scalar).
    pub ce: Array,
    /// Σ weight · cross-entropy.
    pub weighted: Array,
    /// Σ weight (known on the host).
    pub weight: f64,
    /// `loss_scale · ∂(Σ wᵢ·CEᵢ)/∂θ`, f32, laid out as [`Params::banks`].
    pub grad: Banks,
}

impl Pending {
    /// The arrays the micro-batch computes.
    pub fn outputs(&self) -> impl Iterator<Item = &Array> {
        [&self.ce, &self.weighted].into_iter().chain(&self.grad)
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

/// What the forward keeps of an adapted block for its backward.
pub struct Saved {
    /// Its input.
    pub input: Array,
    /// The products of its frozen linears, when it keeps them (else empty).
    pub products: Vec<Array>,
}

/// The adapter as the step differentiates it ([`Lowered`]): in the dtype of the low-rank
/// products ([`block::lora_dtype`]), its scale folded into A, made once a micro-batch rather
/// than cast in every block's forward and again in its recompute (on an 8B step on an H200,
/// 28 small casts a block, a tenth of the step's kernels).
pub fn lowered(model: &Model, params: &Params) -> R<Lowered> {
    Lowered::new(params, block::lora_dtype(model.dtype), &model.cfg)
}

/// One micro-batch's step, the top `keep` adapted blocks keeping their frozen products, its
/// phases timed into `profile`.
pub fn forward_backward(
    model: &Model,
    params: &Params,
    lay: &Layout,
    (loss_scale, keep): (f64, usize),
    mode: Evaluation,
    profile: &mut Profile,
) -> R<Pending> {
    let clock = std::time::Instant::now();
    let params = &lowered(model, params)?;
    let (x, inputs) = forward(model, Some(params), lay, keep, mode)?;
    profile.forward += clock.elapsed();
    let clock = std::time::Instant::now();
    let coef: Vec<f32> = lay
        .target_weights
        .iter()
        .map(|&w| (w as f64 * loss_scale) as f32)
        .collect();
    let (dx, ce, weighted) = head_backward(model, &x, lay, &coef, mode)?;
    drop(x);
    profile.head += clock.elapsed();
    let clock = std::time::Instant::now();
    let grad = params.raised(&backward(model, params, lay, inputs, dx, mode)?)?;
    profile.backward += clock.elapsed();
    Ok(Pending {
        ce,
        weighted,
        weight: lay.target_weights.iter().map(|&w| w as f64).sum(),
        grad,
    })
}

/// The forward without a graph under the lowered adapter `params` (None: the adapter off): the
/// top hidden states and what each adapted block keeps for its backward (nothing without
/// `params`), the top `keep` of them their frozen products too.
pub fn forward(
    model: &Model,
    params: Option<&Lowered>,
    lay: &Layout,
    keep: usize,
    mode: Evaluation,
) -> R<(Array, Vec<Saved>)> {
    let layers = model.blocks.len();
    let lowest = params.map_or(layers, |p| p.lowest().min(layers));
    let kept_from = layers.saturating_sub(keep).max(lowest);
    let mut x = model.embed.take_axis(&lay.ids, 0)?;
    let mut saved = Vec::with_capacity(layers - lowest);
    let mut settler = Settler::new(mode);
    for l in 0..layers {
        let input = x.clone();
        let lora = params.map_or(BlockLora::NONE, |p| p.block(l));
        let products = if l >= kept_from {
            Products::Keep
        } else {
            Products::Compute
        };
        let (out, products) = block::forward(model, l, &x, &lora, &lay.rows(), products)?;
        x = out;
        settler.settle(std::iter::once(&x).chain(&products))?;
        if l >= lowest {
            saved.push(Saved { input, products });
        }
    }
    settler.finish()?;
    Ok((x, saved))
}

/// Each scored row's cross-entropy (f32 `[n]`, in `lay.target_rows` order) from the top hidden
/// states `x`, chunk by chunk, without a graph.
pub fn row_ce(model: &Model, x: &Array, lay: &Layout, mode: Evaluation) -> R<Array> {
    let mut parts: Vec<Array> = vec![];
    let mut settler = Settler::new(mode);
    for (rows, targets, _, _) in chunks(lay) {
        let ce = head::cross_entropy(model, x, &rows, &targets)?;
        settler.settle([&ce])?;
        parts.push(ce);
    }
    settler.finish()?;
    if parts.is_empty() {
        return zeros_dtype(&[0], Dtype::Float32);
    }
    mlx_rs::ops::concatenate(&parts, 0)
}

/// The scored rows of `lay` in head chunks: `(rows, targets, start, len)`.
fn chunks(lay: &Layout) -> impl Iterator<Item = (Array, Array, usize, usize)> + '_ {
    let n = lay.target_rows.len();
    let size = head::chunk_rows();
    (0..n).step_by(size).map(move |start| {
        let len = size.min(n - start);
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
    mode: Evaluation,
) -> R<(Array, Array, Array)> {
    let mut dx = zeros_dtype(x.shape(), x.dtype())?;
    let mut ce_sum = Array::from_f32(0.0);
    let mut weighted = Array::from_f32(0.0);
    let mut settler = Settler::new(mode);
    for (rows, targets, start, len) in chunks(lay) {
        let w = &lay.target_weights[start..start + len];
        let c = Array::from_slice(&coef[start..start + len], &[len as i32]);
        let (grad, ce) = head::chunk_gradient(model, x, &rows, &targets, &c)?;
        dx = dx.add(grad.as_dtype(x.dtype())?)?;
        let ce = &ce;
        ce_sum = ce_sum.add(ce.sum(None)?)?;
        weighted = weighted.add(
            ce.multiply(Array::from_slice(w, &[len as i32]))?
                .sum(None)?,
        )?;
        // One chunk's logits at a time: they are freed before the next chunk is computed.
        settler.settle([&dx, &ce_sum, &weighted])?;
    }
    settler.finish()?;
    Ok((dx, ce_sum, weighted))
}

/// The blocks' backward from `dx` at the top, top down, each block recomputed from what it
/// saved (`saved`, from [`forward`]) and differentiated: the gradients of each block's
/// [`Lowered::block_tensors`], blocks in order ([`Lowered::raised`] makes them the adapter's).
pub fn backward(
    model: &Model,
    params: &Lowered,
    lay: &Layout,
    mut saved: Vec<Saved>,
    mut dx: Array,
    mode: Evaluation,
) -> R<Vec<Array>> {
    let layers = model.blocks.len();
    let lowest = params.lowest().min(layers);
    let mut block_grads: Vec<Vec<Array>> = vec![vec![]; layers];
    let mut settler = Settler::new(mode);
    for l in (lowest..layers).rev() {
        let Saved { input, products } = saved
            .pop()
            .unwrap_or_else(|| unreachable!("one saved input per adapted block"));
        let products = if products.is_empty() {
            Products::Compute
        } else {
            Products::Kept(&products)
        };
        let mut grads = super::compiled::block_backward(
            model,
            l,
            input,
            params.block_tensors(l),
            &dx,
            (params.present(l), params.rank()),
            &lay.rows(),
            products,
        )
        .map_err(|e| match super::kept::take_failure() {
            Some(why) => Exception::custom(format!("{}: {why}", e.what())),
            None => e,
        })?;
        let rest = grads.split_off(1);
        dx = grads.remove(0);
        settler.settle(std::iter::once(&dx).chain(&rest))?;
        block_grads[l] = rest;
    }
    settler.finish()?;
    Ok(block_grads.into_iter().flatten().collect())
}
