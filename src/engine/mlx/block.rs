//! One transformer block's forward on MLX's fused ops (RMSNorm, RoPE, scaled-dot-product
//! attention) and its joined linears ([`super::lowered`]), written once: the step runs it
//! without a graph in the forward and differentiates it, block by block, in the backward (MLX's
//! autograd per block, on a recompute from the block's saved input, and its frozen products
//! where they were kept).

use super::batch::Rows;
use super::kept;
use super::lowered::BlockLora;
use super::weights::Model;
use crate::model::lora::Target;
use mlx_rs::error::Exception;
use mlx_rs::fast::{rms_norm, rope, scaled_dot_product_attention, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::ops::{addmm, concatenate, sigmoid};
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;

type R<T> = Result<T, Exception>;

/// Where a block's frozen products (`x Wᵀ` of its joined linears) come from.
#[derive(Clone, Copy)]
pub enum Products<'a> {
    /// Computed.
    Compute,
    /// Computed, and returned to be kept: the forward of a block that keeps its activations.
    Keep,
    /// Those kept by [`Products::Keep`], one a joined linear ([`Target::BY_INPUT`]
    /// order): the backward's recompute then skips the big matmuls ([`kept`]).
    Kept(&'a [Array]),
}

/// The dtype of the low-rank products: the model's. In bf16 on an H200 (eight 8B-shaped
/// blocks, 2048 tokens) the step took 0.085 s against 0.105 s in f32, whose casts of every
/// input and product and slow f32 matrix products cost more than the thin products themselves;
/// the losses agreed to 1e-4 over ten steps. The training step casts A and B once a
/// micro-batch and their gradients back to f32 ([`super::lowered::Lowered`]), and so does
/// evaluation.
/// A, B and AdamW stay f32 (mlx-lm's LoRA computes in the model's dtype too).
/// `YOUR_AI_MLX_LORA=f32` (read once) keeps the products in f32.
pub fn lora_dtype(model: Dtype) -> Dtype {
    static F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    match F32.get_or_init(|| std::env::var("YOUR_AI_MLX_LORA").as_deref() == Ok("f32")) {
        true => Dtype::Float32,
        false => model,
    }
}

/// `y + (x' Aᵀ) Bᵀ` for the frozen product `y = x Wᵀ` of a joined linear, `A` its targets'
/// A matrices stacked (`[k·r, in]`, the scale folded in) and `B` block-diagonal
/// (`[Σ out, k·r]`): the low-rank term as two thin matmuls in [`lora_dtype`] (never
/// `W + BA`). In the model's dtype the second is one `addmm` that writes the sum (a GEMM with
/// β = 1): no product or addition of its own over `y`'s `[rows, out]`. `x'` is `x`, or with
/// LoRA dropout each target's own dropped copy of it (`dropped`, one a row block of `A`),
/// whose thin products are joined.
pub fn lora_linear(
    y: Array,
    x: &Array,
    term: Option<(&Array, &Array)>,
    dropped: Option<&[Array]>,
    rank: i32,
) -> R<Array> {
    let Some((a, b)) = term else {
        return Ok(y);
    };
    let dtype = lora_dtype(y.dtype());
    let a = a.as_dtype(dtype)?;
    let xa = match dropped {
        None => x.as_dtype(dtype)?.matmul(a.t())?,
        Some(xs) => {
            let parts = xs
                .iter()
                .enumerate()
                .map(|(j, xj)| {
                    let j = j as i32;
                    let aj = a.try_index(j * rank..(j + 1) * rank)?;
                    xj.as_dtype(dtype)?.matmul(aj.t())
                })
                .collect::<R<Vec<_>>>()?;
            concatenate(&parts, 1)?
        }
    };
    let b = b.as_dtype(dtype)?;
    if dtype == y.dtype() {
        addmm(&y, &xa, b.t(), 1.0, 1.0)
    } else {
        y.add(xa.matmul(b.t())?.as_dtype(y.dtype())?)
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

/// Block `layer` on `x` (`[B·T, hidden]`) with the low-rank terms `lora`, its frozen
/// products from `products`: the output, and the products under [`Products::Keep`] (none
/// otherwise).
///
/// The joined q, k and v product is split into heads `[B, T, nh + 2·nkv, d]`: q and k are
/// copied out and rotated together (one RoPE, then views), v is a view. Gate and up are views
/// of their joined product.
pub fn forward(
    model: &Model,
    layer: usize,
    x: &Array,
    lora: &BlockLora,
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
    let proj = |g: usize, input: &Array| -> R<Array> {
        let lin = &blk.linears[g];
        let y = match products {
            Products::Kept(p) => {
                let y = p
                    .get(g)
                    .ok_or_else(|| Exception::custom("a kept block lacks a frozen product"))?;
                kept::product(y, input, lin)?
            }
            Products::Compute | Products::Keep => lin.forward(input)?,
        };
        if let Products::Keep = products {
            keeping.borrow_mut().push(y.clone());
        }
        let dropped = match (lora.groups[g], lay.dropout) {
            (Some(_), Some((p, seed))) if p > 0.0 => Some(
                Target::BY_INPUT[g]
                    .clone()
                    .filter(|&t| lora.present[t])
                    .map(|t| dropout(input, p, seed, layer, t))
                    .collect::<R<Vec<_>>>()?,
            ),
            _ => None,
        };
        lora_linear(y, input, lora.groups[g], dropped.as_deref(), lora.rank)
    };
    let rotate = |y: Array| -> R<Array> {
        match lay.rope {
            None => rope(y, d, false, None, 1.0, 0, Some(&model.rope_freqs)),
            Some((cos, sin)) => rotate_at(&y, cos, sin),
        }
    };

    let h1 = rms_norm(x, Some(&blk.input_norm), eps)?;
    let qkv = proj(0, &h1)?.reshape(&[b, t, nh + 2 * nkv, d])?;
    let qk_v = qkv.split_at_indices(&[nh + nkv], 2)?;
    // q and k are copied out of the joined product for RoPE: MLX's CUDA RoPE (0.32) sizes its
    // output by its input's element count and writes it by the input's strides, and a view
    // from `split` that skips v's columns spans more than its elements.
    let qk = qk_v[0].contiguous()?.transpose_axes(&[0, 2, 1, 3])?;
    let qk = rotate(qk)?.split_at_indices(&[nh], 1)?;
    let v = qk_v[1].transpose_axes(&[0, 2, 1, 3])?;
    let (q, k) = (&qk[0], &qk[1]);
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
    let xmid = x.add(proj(1, &attn)?)?;
    let h2 = rms_norm(&xmid, Some(&blk.post_norm), eps)?;
    let gate_up = proj(2, &h2)?.split_at_indices(&[cfg.intermediate_size as i32], -1)?;
    let (gate, up) = (&gate_up[0], &gate_up[1]);
    let act = gate.multiply(sigmoid(gate)?)?.multiply(up)?;
    let out = xmid.add(proj(3, &act)?)?;
    Ok((out, keeping.into_inner()))
}
