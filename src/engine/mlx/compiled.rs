//! A block's backward (its recompute and vector-Jacobian product) as one compiled MLX function.
//! MLX compiles only outside autograd: a compiled function called on arrays being traced by a
//! vector-Jacobian product just runs its graph, so compiling a part of a block (its SwiGLU,
//! say) inside the differentiated block does nothing. Compiled around the differentiation, the
//! whole backward of a block is traced once and its element-wise chains (norms' and SwiGLU's
//! gradients, casts, residual sums, scalings) are fused into a few kernels, as mlx-lm gets by
//! compiling its whole step. On a GPU each kernel is work the host does to build and launch it,
//! and on an 8B step on an H200 that work, not the GPU's, set the pace (docs/gpu.md).
//!
//! One compiled function a block and shape: the trace holds the block's frozen weights, and
//! everything that changes from step to step (the block's input and output gradient, the
//! adapter's tensors, kept products, masks and RoPE tables) is an input. Lengths come in a few
//! buckets (`batch::layout`), so a run traces a handful of shapes. LoRA dropout draws its masks
//! from per-step keys and is left uncompiled. `YOUR_AI_MLX_COMPILE=0` (read once) turns it
//! off, to compare.

use super::batch::Rows;
use super::block::{self, Products};
use super::lowered::BlockLora;
use super::weights::Model;
use mlx_rs::error::Exception;
use mlx_rs::transforms::fallible_vjp;
use mlx_rs::Array;
use std::cell::RefCell;
use std::collections::HashMap;

type R<T> = Result<T, Exception>;

type Compiled = Box<dyn FnMut(&[Array]) -> R<Vec<Array>>>;

/// What a trace is good for: the block, the micro-batch's shape, which targets carry a pair,
/// whether the block's frozen products are kept, whether there are a mask and RoPE tables,
/// and the adapter's rank.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    layer: usize,
    b: usize,
    t: usize,
    present: [bool; 7],
    kept: bool,
    mask: bool,
    rope: bool,
    rank: i32,
}

/// The compiled backward functions of a model's blocks. A clone is empty.
#[derive(Default)]
pub struct Cache(RefCell<HashMap<Key, Compiled>>);

impl Clone for Cache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Whether blocks' backwards are compiled (`YOUR_AI_MLX_COMPILE=0`: not).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("YOUR_AI_MLX_COMPILE").as_deref() != Ok("0"))
}

/// Block `layer`'s backward: the gradients for its input and its LoRA tensors (`lora`, as
/// [`super::lowered::Lowered::block_tensors`] gives them) given `dx`, the gradient of its
/// output, with its frozen products from `products`. Compiled where it can be ([`enabled`], no
/// dropout); otherwise MLX's autograd on the block as it is.
#[allow(clippy::too_many_arguments)]
pub fn block_backward(
    model: &Model,
    layer: usize,
    input: Array,
    lora: Vec<Array>,
    dx: &Array,
    (present, rank): ([bool; 7], i32),
    rows: &Rows,
    products: Products,
) -> R<Vec<Array>> {
    let kept = match products {
        Products::Kept(p) => p,
        _ => &[],
    };
    let mut primals = vec![input];
    primals.extend(lora);
    if !enabled() || rows.dropout.is_some() {
        let how = (layer, present, rank);
        return differentiate(model, how, rows, products, &primals, dx);
    }
    let key = Key {
        layer,
        b: rows.b,
        t: rows.t,
        present,
        kept: !kept.is_empty(),
        mask: rows.mask.is_some(),
        rope: rows.rope.is_some(),
        rank,
    };
    let n = primals.len();
    let mut args = primals;
    args.push(dx.clone());
    args.extend(kept.iter().cloned());
    args.extend(rows.mask.cloned());
    if let Some((cos, sin)) = rows.rope {
        args.extend([cos.clone(), sin.clone()]);
    }
    let mut cache = model
        .compiled
        .0
        .try_borrow_mut()
        .map_err(|_| Exception::custom("a block's compiled backward called within itself"))?;
    let f = cache
        .entry(key)
        .or_insert_with(|| trace(model.clone(), key, n, kept.len()));
    f(&args)
}

/// MLX's autograd on block `layer` (its targets `present`, of rank `rank`): the gradients for
/// `primals` (the block's input, then its LoRA tensors) given `dx`.
fn differentiate(
    model: &Model,
    (layer, present, rank): (usize, [bool; 7], i32),
    rows: &Rows,
    products: Products,
    primals: &[Array],
    dx: &Array,
) -> R<Vec<Array>> {
    let f = |args: &[Array]| -> R<Vec<Array>> {
        let lora = BlockLora::unflatten(present, rank, &args[1..]);
        let (out, _) = block::forward(model, layer, &args[0], &lora, rows, products)?;
        Ok(vec![out])
    };
    let (_, grads) = fallible_vjp(f, primals, std::slice::from_ref(dx))?;
    Ok(grads)
}

/// The compiled backward for `key`: its arguments are the block's input and LoRA tensors (`n`
/// in all), the output's gradient, `kept` frozen products, then the mask and the RoPE tables
/// when `key` has them.
fn trace(model: Model, key: Key, n: usize, kept: usize) -> Compiled {
    let f = move |args: &[Array]| -> R<Vec<Array>> {
        if args.len() < n + 1 + kept {
            return Err(Exception::custom(
                "a block's compiled backward got too few arrays",
            ));
        }
        let (primals, rest) = args.split_at(n);
        let (dx, rest) = rest.split_at(1);
        let (products, rest) = rest.split_at(kept);
        let (mask, rest) = rest.split_at(key.mask as usize);
        let rope = match rest {
            [cos, sin] if key.rope => Some((cos, sin)),
            [] if !key.rope => None,
            _ => {
                return Err(Exception::custom(
                    "a block's compiled backward got stray arrays",
                ))
            }
        };
        let rows = Rows {
            b: key.b,
            t: key.t,
            mask: mask.first(),
            rope,
            dropout: None,
        };
        let products = if kept > 0 {
            Products::Kept(products)
        } else {
            Products::Compute
        };
        let how = (key.layer, key.present, key.rank);
        differentiate(&model, how, &rows, products, primals, &dx[0])
    };
    let mut compiled = mlx_rs::transforms::compile::compile(f, false);
    Box::new(move |a: &[Array]| compiled(a))
}
