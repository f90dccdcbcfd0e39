//! The adapter as the step computes with it: in the dtype of the low-rank products, its scale
//! folded into A, and laid out for the block's joined projections.
//!
//! A block's linears that share an input (q, k and v; gate and up) are one matrix product
//! ([`Target::BY_INPUT`], [`super::weights::Block`]), and so are their low-rank terms: `x Aᵀ`
//! with the group's A matrices stacked (`[k·r, in]`, a view: they lie in a row in the A bank),
//! then one `addmm` with a block-diagonal B (`[Σ out, k·r]`, each target's B in its own rows
//! and columns, zeros elsewhere). A block then makes 4 frozen products, 4 thin ones and 4
//! `addmm`s where it made 7 of each, and its backward 20 matrix products where it made 35: on a GPU
//! each is host work to build and launch (MLX queries cuBLASLt's heuristics for every product),
//! and on an 8B step on an H200 the host's work, not the GPU's, set the pace (docs/gpu.md).
//!
//! The block-diagonal Bs of every block are one vector, filled from the B bank by one gather
//! of rank-wide rows (with a zero row for the blocks off the diagonal), and their gradients go
//! back by the inverse gather: three kernels a micro-batch for the whole model. Off the diagonal
//! the products compute zeros and gradients nobody reads, `(k·Σ out − Σ own out)·r` values a
//! group: at rank 16 on an 8B block, about a percent of its frozen products' arithmetic.

use super::diagonal::Groups;
use super::params::{alternate, Banks, Params};
use crate::model::lora::Target;
use crate::model::ModelConfig;
use mlx_rs::error::Exception;
use mlx_rs::ops::concatenate;
use mlx_rs::{Array, Dtype};

type R<T> = Result<T, Exception>;

/// The output width of each target's linear, in target order.
pub fn widths(cfg: &ModelConfig) -> [i32; 7] {
    Target::ALL.map(|t| t.dims(cfg).1 as i32)
}

/// A block's low-rank terms by group: `(A [k·r, in], B [Σ out, k·r])`, `k` the group's targets
/// that carry a pair, block-diagonal B; and which targets carry one.
#[derive(Clone, Copy)]
pub struct BlockLora<'a> {
    pub groups: [Option<(&'a Array, &'a Array)>; 4],
    pub present: [bool; 7],
    pub rank: i32,
}

impl BlockLora<'_> {
    /// No adapter.
    pub const NONE: BlockLora<'static> = BlockLora {
        groups: [None; 4],
        present: [false; 7],
        rank: 0,
    };

    /// A block's terms from its flattened tensors (`A, B` of each group that carries a pair,
    /// in group order), as the differentiated block function receives them.
    pub fn unflatten(present: [bool; 7], rank: i32, flat: &[Array]) -> BlockLora<'_> {
        let mut groups: [Option<(&Array, &Array)>; 4] = Default::default();
        let mut it = flat.iter();
        for (slot, g) in groups.iter_mut().zip(Target::BY_INPUT) {
            if present[g].contains(&true) {
                if let (Some(a), Some(b)) = (it.next(), it.next()) {
                    *slot = Some((a, b));
                }
            }
        }
        BlockLora {
            groups,
            present,
            rank,
        }
    }
}

/// The adapter lowered for a step or an evaluation ([`Lowered::new`]).
pub struct Lowered {
    /// `[block][group]`: views of the lowered A bank and of the block-diagonal B vector.
    groups: Vec<Groups>,
    present: Vec<[bool; 7]>,
    rank: i32,
    lowest: usize,
    /// For each row of the B bank (`rank` values), its row in the block-diagonal vector.
    back: Array,
    /// The adapter's LoRA scale, folded into A.
    fold: f32,
    sizes: [usize; 2],
}

impl Lowered {
    /// `params` (of a model of config `model`) in `dtype`, the LoRA scale folded into the A
    /// bank (`s·A`: the blocks add `x (sA)ᵀ Bᵀ` with no scaling of their own; an `addmm` with
    /// α = s multiplied each `[rows, out]` cotangent by s in the backward, twice a target), the
    /// Bs laid out block-diagonally by group. A multiply and a cast for the A bank, a cast and
    /// a gather for the Bs, made once a micro-batch (or evaluation batch).
    pub fn new(params: &Params, dtype: Dtype, model: &ModelConfig) -> R<Self> {
        let cfg = &params.cfg;
        let rank = cfg.rank as i32;
        let present: Vec<[bool; 7]> = (0..params.blocks()).map(|l| params.present(l)).collect();
        let plan = params.diagonal(widths(model))?;
        let [a, b] = &params.banks;
        let fold = cfg.scale() as f32;
        let a = match fold {
            1.0 => a.clone(),
            s => a.multiply(Array::from_f32(s))?,
        }
        .as_dtype(dtype)?;
        let zero = mlx_rs::ops::zeros_dtype(&[1, rank], dtype)?;
        let b = concatenate(&[b.as_dtype(dtype)?.reshape(&[-1, rank])?, zero], 0)?;
        let diag = b.take_axis(&plan.fill, 0)?.reshape(&[-1])?;
        let groups = plan.views(&a, &diag)?;
        Ok(Self {
            groups,
            rank,
            lowest: params.lowest(),
            back: plan.back.clone(),
            fold,
            sizes: params.bank_sizes(),
            present,
        })
    }

    /// Block `layer`'s terms.
    pub fn block(&self, layer: usize) -> BlockLora<'_> {
        let mut groups: [Option<(&Array, &Array)>; 4] = Default::default();
        for (slot, g) in groups.iter_mut().zip(&self.groups[layer]) {
            *slot = g.as_ref().map(|(a, b)| (a, b));
        }
        BlockLora {
            groups,
            present: self.present[layer],
            rank: self.rank,
        }
    }

    /// Block `layer`'s tensors, flattened as [`BlockLora::unflatten`] takes them.
    pub fn block_tensors(&self, layer: usize) -> Vec<Array> {
        self.groups[layer]
            .iter()
            .flatten()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect()
    }

    /// Which targets of block `layer` carry a pair.
    pub fn present(&self, layer: usize) -> [bool; 7] {
        self.present[layer]
    }

    /// The adapter's rank.
    pub fn rank(&self) -> i32 {
        self.rank
    }

    /// The lowest block with a pair: the backward stops there.
    pub fn lowest(&self) -> usize {
        self.lowest
    }

    /// The gradients of the blocks' tensors (each block's [`Lowered::block_tensors`], blocks
    /// in order) as the adapter's banks: in f32, the Bs' gathered from the block-diagonal
    /// layout, the A bank's scaled back by the fold.
    pub fn raised(&self, grads: &[Array]) -> R<Banks> {
        let a = alternate(grads, 0)?;
        let diag = alternate(grads, 1)?;
        let b = match diag.size() {
            0 => diag,
            _ => diag
                .reshape(&[-1, self.rank])?
                .take_axis(&self.back, 0)?
                .reshape(&[-1])?,
        };
        if [a.size(), b.size()] != self.sizes {
            return Err(Exception::custom(format!(
                "the step's gradients hold {:?} values, the adapter {:?}",
                [a.size(), b.size()],
                self.sizes
            )));
        }
        let a = a.as_dtype(Dtype::Float32)?;
        let a = match self.fold {
            1.0 => a,
            f => a.multiply(Array::from_f32(f))?,
        };
        Ok([a, b.as_dtype(Dtype::Float32)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::{Adapter, LoraConfig};
    use candle_core::{Device, Tensor};

    /// Each block-diagonal B holds its targets' Bs in their own rows and columns and zeros
    /// elsewhere (a group's absent target, k here in block 1, has rows of zeros), the stacked
    /// A is the group's As in order and scaled, and [`Lowered::raised`] takes gradients laid
    /// out that way back to the adapter's banks, bit for bit.
    #[test]
    fn the_block_diagonal_layout_round_trips() -> R<()> {
        let _serial = super::super::checks::serial();
        let model = ModelConfig::from_hf_json(
            &serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 10}),
            "t",
        )
        .map_err(|e| Exception::custom(e.to_string()))?;
        let cfg = LoraConfig {
            rank: 2,
            alpha: 6.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            layers: vec![0, 1],
            use_rslora: false,
        };
        let fail = |e: &dyn std::fmt::Display| Exception::custom(e.to_string());
        let mut adapter = Adapter::init(cfg, &model, 1, &Device::Cpu).map_err(|e| fail(&e))?;
        adapter.pairs[1][Target::K.index()] = None;
        for t in adapter.tensors_mut() {
            *t = Tensor::randn(0f32, 1.0, t.dims(), &Device::Cpu).map_err(|e| fail(&e))?;
        }
        let params = Params::from_adapter(&adapter).map_err(|e| fail(&e))?;
        let low = Lowered::new(&params, Dtype::Float32, &model)?;
        let host = |a: &Array| -> R<Vec<f32>> {
            let a = a.as_dtype(Dtype::Float32)?;
            a.eval()?;
            Ok(a.as_slice::<f32>().to_vec())
        };
        let w = widths(&model);
        for l in 0..2 {
            let lora = low.block(l);
            for (g, range) in Target::BY_INPUT.iter().enumerate() {
                let (a, b) = lora.groups[g].ok_or_else(|| Exception::custom("a group lacks"))?;
                let outs: i32 = w[range.clone()].iter().sum();
                let present: Vec<usize> = range.clone().filter(|&t| lora.present[t]).collect();
                let k = present.len() as i32;
                assert_eq!(b.shape(), [outs, 2 * k], "block {l} group {g}");
                let (a, b) = (host(a)?, host(b)?);
                let mut want_b = vec![0f32; (outs * 2 * k) as usize];
                let mut want_a = vec![];
                for (j, &t) in present.iter().enumerate() {
                    let pair = adapter.pairs[l][t]
                        .as_ref()
                        .ok_or_else(|| Exception::custom("?"))?;
                    let flat = |x: &Tensor| -> Vec<f32> {
                        x.flatten_all()
                            .and_then(|x| x.to_vec1())
                            .unwrap_or_default()
                    };
                    want_a.extend(flat(&pair.a).iter().map(|v| v * 3.0));
                    let off: i32 = w[range.start..t].iter().sum();
                    for (i, v) in flat(&pair.b).iter().enumerate() {
                        let (o, c) = (i as i32 / 2, i as i32 % 2);
                        want_b[((off + o) * 2 * k + 2 * j as i32 + c) as usize] = *v;
                    }
                }
                assert_eq!(a, want_a, "block {l} group {g}: A");
                assert_eq!(b, want_b, "block {l} group {g}: B");
            }
        }
        let grads: Vec<Array> = (0..2).flat_map(|l| low.block_tensors(l)).collect();
        let [ga, gb] = low.raised(&grads)?;
        let [pa, pb] = &params.banks;
        let scaled: Vec<f32> = host(pa)?.iter().map(|v| v * 3.0 * 3.0).collect();
        assert_eq!(host(&ga)?, scaled);
        assert_eq!(host(&gb)?, host(pb)?);
        assert!(low.raised(&grads[..grads.len() - 2]).is_err());
        Ok(())
    }
}
