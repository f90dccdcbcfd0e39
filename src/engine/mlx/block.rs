//! One transformer block's forward on MLX's fused ops (RMSNorm, RoPE, scaled-dot-product
//! attention), written once: the step runs it without a graph in the forward and
//! differentiates it, block by block, in the backward (MLX's autograd per block, on a
//! recompute from the block's saved input, and its frozen products where they were kept).

use super::batch::Rows;
use super::kept;
use super::weights::Model;
use mlx_rs::error::Exception;
use mlx_rs::fast::{rms_norm, rope, scaled_dot_product_attention, ScaledDotProductAttentionMask};
use mlx_rs::ops::{addmm, concatenate, sigmoid};
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;

type R<T> = Result<T, Exception>;

/// Where a block's frozen products (`x Wᵀ` of its seven linears) come from.
#[derive(Clone, Copy)]
pub enum Products<'a> {
    /// Computed.
    Compute,
    /// Computed, and returned to be kept: the forward of a block that keeps its activations.
    Keep,
    /// Those kept by [`Products::Keep`], in [`crate::model::lora::Target`] order: the
    /// backward's recompute then skips the big matmuls ([`kept`]).
    Kept(&'a [Array]),
}

/// A block's LoRA pairs by target: `(A [r, in], B [out, r])`, f32.
pub type Pairs<'a> = [Option<(&'a Array, &'a Array)>; 7];

/// The dtype of the low-rank products: the model's. In bf16 on an H200 (eight 8B-shaped
/// blocks, 2048 tokens) the step took 0.085 s against 0.105 s in f32, whose casts of every
/// input and product and slow f32 matrix products cost more than the thin products themselves;
/// the losses agreed to 1e-4 over ten steps. The training step casts A and B once a
/// micro-batch and their gradients back to f32 (`Params::lowered`, `Params::raised`), and so
/// does evaluation.
/// A, B and AdamW stay f32 (mlx-lm's LoRA computes in the model's dtype too).
/// `YOUR_AI_MLX_LORA=f32` (read once) keeps the products in f32.
pub fn lora_dtype(model: Dtype) -> Dtype {
    static F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    match F32.get_or_init(|| std::env::var("YOUR_AI_MLX_LORA").as_deref() == Ok("f32")) {
        true => Dtype::Float32,
        false => model,
    }
}

/// `y + s · (x' Aᵀ) Bᵀ` for the frozen product `y = x Wᵀ`: the low-rank term as two thin
/// matmuls in [`lora_dtype`] (never `W + BA`). In the model's dtype the second is one `addmm`
/// that writes the sum (a GEMM with β = 1 and α = s): no product, scaling or addition of its
/// own over `y`'s `[rows, out]`. The training step folds s into A (`Params::lowered`), so α is
/// 1 there: addmm's vector-Jacobian product multiplies the `[rows, out]` cotangent by α for
/// each factor's gradient. `x'` is `dropped` (the input after LoRA dropout) when given, else
/// `x`.
pub fn lora_linear(
    y: Array,
    x: &Array,
    pair: Option<(&Array, &Array)>,
    scale: f32,
    dropped: Option<&Array>,
) -> R<Array> {
    match pair {
        None => Ok(y),
        Some((a, b)) => {
            let dtype = lora_dtype(y.dtype());
            let xa = dropped
                .unwrap_or(x)
                .as_dtype(dtype)?
                .matmul(a.as_dtype(dtype)?.t())?;
            let b = b.as_dtype(dtype)?;
            if dtype == y.dtype() {
                addmm(&y, &xa, b.t(), scale, 1.0)
            } else {
                let delta = xa.matmul(b.t())?.multiply(Array::from_f32(scale))?;
                y.add(delta.as_dtype(y.dtype())?)
            }
        }
    }
}

/// LoRA dropout on the input `x` of target `target` of block `layer`: each entry kept with
/// probability `1 − p` and scaled by `1/(1 − p)`, drawn on the device by MLX's generator from a
/// key of `(seed, layer, target)`, so the block's recompute in the backward draws the same
/// mask. (The candle engine draws its masks on the host from another generator: the two
/// engines agree on everything but which entries a run drops.)
pub fn dropout(x: &Array, p: f64, seed: u64, layer: usize, target: usize) -> R<Array> {
    let stream = seed ^ ((layer as u64) << 40) ^ ((target as u64) << 56);
    let key = mlx_rs::random::key(stream)?;
    let keep = Array::from_f32((1.0 - p) as f32);
    let mask = mlx_rs::random::bernoulli(&keep, x.shape(), &key)?;
    let scaled = mask
        .as_dtype(x.dtype())?
        .multiply(Array::from_f32((1.0 / (1.0 - p)) as f32).as_dtype(x.dtype())?)?;
    x.multiply(&scaled)
}

/// RoPE at given positions (`cos`, `sin`: `[B, 1, T, d/2]`) on `y` (`[B, n, T, d]`), in the
/// half-split convention MLX's `rope` uses: `y₁ cos − y₂ sin`, `y₂ cos + y₁ sin`. For packed
/// rows, whose positions restart with each document (MLX's fused op takes one offset).
fn rotate_at(y: &Array, cos: &Array, sin: &Array) -> R<Array> {
    let halves = y.split_equal(2, -1)?;
    let (y1, y2) = (&halves[0], &halves[1]);
    let (c, s) = (cos.as_dtype(y.dtype())?, sin.as_dtype(y.dtype())?);
    concatenate(
        &[
            y1.multiply(&c)?.subtract(y2.multiply(&s)?)?,
            y2.multiply(&c)?.add(y1.multiply(&s)?)?,
        ],
        -1,
    )
}

/// Block `layer` on `x` (`[B·T, hidden]`) with `pairs` at LoRA scale `scale`, its frozen
/// products from `products`: the output, and the products under [`Products::Keep`] (none
/// otherwise).
pub fn forward(
    model: &Model,
    layer: usize,
    x: &Array,
    pairs: &Pairs,
    scale: f32,
    lay: &Rows,
    products: Products,
) -> R<(Array, Vec<Array>)> {
    let cfg = &model.cfg;
    let blk = &model.blocks[layer];
    let (b, t) = (lay.b as i32, lay.t as i32);
    let (nh, nkv, d) = (
        cfg.num_attention_heads as i32,
        cfg.num_key_value_heads as i32,
        cfg.head_dim as i32,
    );
    let eps = cfg.rms_norm_eps as f32;
    let keeping = RefCell::new(vec![]);
    let proj = |i: usize, input: &Array| -> R<Array> {
        let lin = &blk.linears[i];
        let y = match products {
            Products::Kept(p) => {
                let y = p
                    .get(i)
                    .ok_or_else(|| Exception::custom("a kept block lacks a frozen product"))?;
                kept::product(y, input, lin)?
            }
            Products::Compute | Products::Keep => lin.forward(input)?,
        };
        if let Products::Keep = products {
            keeping.borrow_mut().push(y.clone());
        }
        let dropped = match (pairs[i], lay.dropout) {
            (Some(_), Some((p, seed))) if p > 0.0 => Some(dropout(input, p, seed, layer, i)?),
            _ => None,
        };
        lora_linear(y, input, pairs[i], scale, dropped.as_ref())
    };
    let heads =
        |y: Array, n: i32| -> R<Array> { y.reshape(&[b, t, n, d])?.transpose_axes(&[0, 2, 1, 3]) };
    let rotate = |y: Array| -> R<Array> {
        match lay.rope {
            None => rope(y, d, false, None, 1.0, 0, Some(&model.rope_freqs)),
            Some((cos, sin)) => rotate_at(&y, cos, sin),
        }
    };

    let h1 = rms_norm(x, Some(&blk.input_norm), eps)?;
    let q = rotate(heads(proj(0, &h1)?, nh)?)?;
    let k = rotate(heads(proj(1, &h1)?, nkv)?)?;
    let v = heads(proj(2, &h1)?, nkv)?;
    let scale_qk = 1.0 / (d as f32).sqrt();
    let attn = match lay.mask {
        None => scaled_dot_product_attention(
            q,
            k,
            v,
            scale_qk,
            ScaledDotProductAttentionMask::Causal,
            None,
        )?,
        Some(m) => {
            let m = m.as_dtype(model.dtype)?;
            scaled_dot_product_attention(q, k, v, scale_qk, &m, None)?
        }
    };
    let attn = attn
        .transpose_axes(&[0, 2, 1, 3])?
        .reshape(&[b * t, nh * d])?;
    let xmid = x.add(proj(3, &attn)?)?;
    let h2 = rms_norm(&xmid, Some(&blk.post_norm), eps)?;
    let gate = proj(4, &h2)?;
    let up = proj(5, &h2)?;
    let act = gate.multiply(sigmoid(&gate)?)?.multiply(&up)?;
    let out = xmid.add(proj(6, &act)?)?;
    Ok((out, keeping.into_inner()))
}
