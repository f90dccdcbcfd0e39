//! The adapter being trained, as MLX arrays (f32 always). Its tensors, in the adapter's own
//! order (A then B of each pair, in [`Adapter::iter`] order, the order of checkpoints'
//! optimizer moments), are held in two vectors, the banks: every A flattened and joined, and
//! every B. AdamW updates a bank, the step casts one, and the gradient norm reduces one, each in
//! one go; a tensor at a time, on an 8B step on an H200, that was about 2,000 small kernels a
//! step (three an update, a cast each way) of the step's 9,600, each costing the host more to
//! build than the GPU to run. The pairs by block and target are views of the banks. The step
//! computes with them lowered ([`super::lowered`]): cast, the LoRA scale folded into the A
//! bank, the Bs laid out for the blocks' joined projections.

use super::convert::{to_array, to_tensor};
use super::diagonal::Plan;
use crate::error::Result;
use crate::model::lora::{Adapter, LoraConfig, LoraPair, Target};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, Dtype};
use std::cell::OnceCell;
use std::rc::Rc;

type R<T> = std::result::Result<T, Exception>;

/// A block's pairs by target: `(A [r, in], B [out, r])`.
pub type BlockPairs = [Option<(Array, Array)>; 7];

/// Two vectors: every A matrix flattened and joined in adapter order, then every B.
pub type Banks = [Array; 2];

pub struct Params {
    pub cfg: LoraConfig,
    /// The A bank and the B bank.
    pub banks: Banks,
    /// Each tensor's shape, in adapter order.
    shapes: Vec<[i32; 2]>,
    /// Which targets of each block carry a pair.
    slots: Vec<[bool; 7]>,
    /// `[block][target]`: `(A [r, in], B [out, r])`, views of the banks.
    pub pairs: Vec<BlockPairs>,
    /// The lowered layout, made on first use ([`Params::diagonal`]).
    diagonal: OnceCell<Rc<Plan>>,
}

impl Params {
    pub fn from_adapter(a: &Adapter) -> Result<Self> {
        let mut tensors = vec![];
        let mut slots = vec![];
        for ps in &a.pairs {
            let mut present = [false; 7];
            for t in Target::ALL {
                if let Some(p) = &ps[t.index()] {
                    present[t.index()] = true;
                    tensors.push(to_array(&p.a, Dtype::Float32)?);
                    tensors.push(to_array(&p.b, Dtype::Float32)?);
                }
            }
            slots.push(present);
        }
        let shapes = tensors
            .iter()
            .map(|t| match t.shape() {
                [r, c] => Ok([*r, *c]),
                other => Err(Exception::custom(format!(
                    "a LoRA tensor of shape {other:?}, not a matrix"
                ))),
            })
            .collect::<R<Vec<_>>>()?;
        // A bank is one MLX array, whose dimensions and offsets are 32-bit.
        if let Some(n) = totals(&shapes).into_iter().find(|&n| n > i32::MAX as u64) {
            return Err(crate::error::Error::Usage(format!(
                "the MLX engine holds the adapter's A and B matrices in two vectors of at most \
                 {} values, and this adapter needs {n}: use a lower --lora-rank, fewer \
                 --lora-targets or --num-layers, or --engine candle",
                i32::MAX
            )));
        }
        let banks = join(&tensors)?;
        mlx_rs::transforms::eval(&banks)?;
        let pairs = pairs_of(&banks, &shapes, &slots)?;
        Ok(Self {
            cfg: a.cfg.clone(),
            banks,
            shapes,
            slots,
            pairs,
            diagonal: OnceCell::new(),
        })
    }

    /// The adapter on the host.
    pub fn to_adapter(&self) -> Result<Adapter> {
        let pairs = self
            .pairs
            .iter()
            .map(|ps| -> Result<[Option<LoraPair>; 7]> {
                let mut out: [Option<LoraPair>; 7] = Default::default();
                for (i, p) in ps.iter().enumerate() {
                    if let Some((a, b)) = p {
                        out[i] = Some(LoraPair {
                            a: to_tensor(a)?,
                            b: to_tensor(b)?,
                        });
                    }
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Adapter {
            cfg: self.cfg.clone(),
            pairs,
        })
    }

    /// The adapter with its banks replaced by `banks` (laid out alike).
    pub fn with(&self, banks: Banks) -> R<Self> {
        let pairs = pairs_of(&banks, &self.shapes, &self.slots)?;
        Ok(Self {
            cfg: self.cfg.clone(),
            banks,
            shapes: self.shapes.clone(),
            slots: self.slots.clone(),
            pairs,
            diagonal: self.diagonal.clone(),
        })
    }

    /// Each tensor's shape, in adapter order.
    pub fn shapes(&self) -> &[[i32; 2]] {
        &self.shapes
    }

    /// Values in each bank.
    pub fn bank_sizes(&self) -> [usize; 2] {
        totals(&self.shapes).map(|n| n as usize)
    }

    /// Where the lowered adapter lies on a model whose linears have output widths `widths`
    /// (in target order), made once and kept with the adapter and its updates.
    pub fn diagonal(&self, widths: [i32; 7]) -> R<Rc<Plan>> {
        if let Some(plan) = self.diagonal.get().filter(|p| p.widths == widths) {
            return Ok(plan.clone());
        }
        let rank = self.cfg.rank as i32;
        let plan = Rc::new(Plan::new(&self.slots, &self.shapes, widths, rank)?);
        // The first layout made stays (a second model's is remade on each call).
        let _ = self.diagonal.set(plan.clone());
        Ok(plan)
    }

    /// The blocks (adapted or not).
    pub fn blocks(&self) -> usize {
        self.slots.len()
    }

    /// The lowest block with a pair: the backward stops there.
    pub fn lowest(&self) -> usize {
        self.cfg.layers.first().copied().unwrap_or(self.pairs.len())
    }

    /// Which targets of block `layer` carry a pair.
    pub fn present(&self, layer: usize) -> [bool; 7] {
        self.slots[layer]
    }

    /// Block `layer`'s tensors, A then B of each pair in target order.
    pub fn block_tensors(&self, layer: usize) -> Vec<Array> {
        self.pairs[layer]
            .iter()
            .flatten()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect()
    }

    /// Every tensor, in adapter order.
    pub fn tensors(&self) -> Vec<Array> {
        (0..self.pairs.len())
            .flat_map(|l| self.block_tensors(l))
            .collect()
    }

    /// Replaces every tensor, given in adapter order.
    pub fn set_tensors(&mut self, new: &[Array]) -> R<()> {
        *self = self.with(join(new)?)?;
        Ok(())
    }

    /// `banks` (laid out as [`Params::banks`]: gradients, AdamW's moments) as one view a
    /// tensor, in adapter order.
    pub fn split(&self, banks: &[Array]) -> R<Vec<Array>> {
        views(banks, &self.shapes)
    }
}

/// `tensors` (in adapter order: A, B, A, B, ...) flattened and joined into banks, in f32: a
/// concatenation in their dtype, then one cast (MLX's concatenation would cast each input to a
/// different result dtype first).
pub fn join(tensors: &[Array]) -> R<Banks> {
    Ok([
        alternate(tensors, 0)?.as_dtype(Dtype::Float32)?,
        alternate(tensors, 1)?.as_dtype(Dtype::Float32)?,
    ])
}

/// Every other tensor of `tensors` from `parity` (0: the As of A, B, A, B, ...; 1: the Bs),
/// flattened and concatenated in their dtype (an empty f32 vector when there are none).
pub fn alternate(tensors: &[Array], parity: usize) -> R<Array> {
    let flat = tensors
        .iter()
        .skip(parity)
        .step_by(2)
        .map(|t| t.reshape(&[-1]))
        .collect::<R<Vec<_>>>()?;
    match flat.is_empty() {
        true => mlx_rs::ops::zeros_dtype(&[0], Dtype::Float32),
        false => mlx_rs::ops::concatenate(&flat, 0),
    }
}

/// Values in each bank for tensors of `shapes` (adapter order: A, B, A, B, ...).
fn totals(shapes: &[[i32; 2]]) -> [u64; 2] {
    let mut out = [0, 0];
    for (i, [r, c]) in shapes.iter().enumerate() {
        out[i % 2] += *r as u64 * *c as u64;
    }
    out
}

/// Views of the banks as tensors of `shapes` (adapter order): A, B, A, B, ...
fn views(banks: &[Array], shapes: &[[i32; 2]]) -> R<Vec<Array>> {
    let mut starts = [0, 0];
    shapes
        .iter()
        .enumerate()
        .map(|(i, &[r, c])| {
            let start = &mut starts[i % 2];
            let bank = banks
                .get(i % 2)
                .ok_or_else(|| Exception::custom("an adapter is held in two banks"))?;
            let view = bank.try_index(*start..*start + r * c)?.reshape(&[r, c])?;
            *start += r * c;
            Ok(view)
        })
        .collect()
}

/// The pairs over `banks`, tensors of `shapes` in adapter order, blocks' targets by `slots`.
fn pairs_of(banks: &Banks, shapes: &[[i32; 2]], slots: &[[bool; 7]]) -> R<Vec<BlockPairs>> {
    let mut views = views(banks, shapes)?.into_iter();
    slots
        .iter()
        .map(|present| {
            let mut out: BlockPairs = Default::default();
            for (slot, here) in out.iter_mut().zip(present) {
                if *here {
                    let (Some(a), Some(b)) = (views.next(), views.next()) else {
                        return Err(Exception::custom(
                            "the adapter has fewer tensors than its pairs",
                        ));
                    };
                    *slot = Some((a, b));
                }
            }
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::mlx::graph;

    /// bf16 gradients join into f32 banks with one concatenation and one cast a bank, not a
    /// cast apiece; A matrices in one bank, B in the other, in adapter order.
    #[test]
    fn join_makes_two_banks() -> R<()> {
        let _serial = super::super::checks::serial();
        let bf16 = |v: &[f32], shape: &[i32]| Array::from_slice(v, shape).as_dtype(Dtype::Bfloat16);
        let t = [
            bf16(&[1.5, -2.0], &[1, 2])?,
            bf16(&[3.0, 4.0, 5.0], &[3, 1])?,
            bf16(&[0.5, 0.25], &[1, 2])?,
            bf16(&[7.0, 8.0, 9.0], &[3, 1])?,
        ];
        mlx_rs::transforms::eval(&t)?;
        let banks = join(&t)?;
        let nodes = graph::census(&graph::print(&[&banks[0], &banks[1]])?);
        assert_eq!(nodes.get("Concatenate"), Some(&2), "{nodes:?}");
        assert_eq!(nodes.get("AsType"), Some(&2), "{nodes:?}");
        mlx_rs::transforms::eval(&banks)?;
        assert!(banks.iter().all(|b| b.dtype() == Dtype::Float32));
        assert_eq!(banks[0].as_slice::<f32>(), [1.5, -2.0, 0.5, 0.25]);
        assert_eq!(banks[1].as_slice::<f32>(), [3.0, 4.0, 5.0, 7.0, 8.0, 9.0]);
        Ok(())
    }
}
