//! The adapter being trained, as MLX arrays (f32 always): its tensors in the adapter's own order
//! (A then B of each pair, in [`Adapter::iter`] order), which is also the order of gradients and
//! optimizer moments, flattened and joined into one vector, and its pairs by block and target as
//! views of that vector.

use super::convert::{to_array, to_tensor};
use crate::error::Result;
use crate::model::lora::{Adapter, LoraConfig, LoraPair, Target};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, Dtype};

type R<T> = std::result::Result<T, Exception>;

/// A block's pairs by target: `(A [r, in], B [out, r])`.
pub type BlockPairs = [Option<(Array, Array)>; 7];

pub struct Params {
    pub cfg: LoraConfig,
    /// Every tensor flattened and joined in adapter order, `[n]`: what AdamW updates and the
    /// step casts, each in one go. A tensor at a time, on an 8B step on an H200, they were
    /// about 2,000 kernels a step (three an update, a cast each way) of the step's 9,600, each
    /// too small to keep the GPU busy for what the host spends building it.
    pub flat: Array,
    /// Each tensor's shape, in adapter order.
    shapes: Vec<[i32; 2]>,
    /// `[block][target]`: `(A [r, in], B [out, r])`, views of `flat`.
    pub pairs: Vec<BlockPairs>,
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
        let flat = join(&tensors)?;
        flat.eval()?;
        let pairs = pairs_of(&flat, &shapes, &slots)?;
        Ok(Self {
            cfg: a.cfg.clone(),
            flat,
            shapes,
            pairs,
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

    /// The adapter in `dtype`: one cast of [`Params::flat`] (none when it is in `dtype`).
    pub fn cast(&self, dtype: Dtype) -> R<Self> {
        self.with_flat(self.flat.as_dtype(dtype)?)
    }

    /// The adapter with [`Params::flat`] replaced by `flat` (of the same length).
    pub fn with_flat(&self, flat: Array) -> R<Self> {
        let pairs = pairs_of(&flat, &self.shapes, &self.slots())?;
        Ok(Self {
            cfg: self.cfg.clone(),
            flat,
            shapes: self.shapes.clone(),
            pairs,
        })
    }

    /// Which targets of each block carry a pair.
    fn slots(&self) -> Vec<[bool; 7]> {
        (0..self.pairs.len()).map(|l| present(self, l)).collect()
    }

    /// The number of values in the adapter.
    pub fn len(&self) -> usize {
        self.shapes.iter().map(|[r, c]| (r * c) as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn scale(&self) -> f32 {
        self.cfg.scale() as f32
    }

    /// The lowest block with a pair: the backward stops there.
    pub fn lowest(&self) -> usize {
        self.cfg.layers.first().copied().unwrap_or(self.pairs.len())
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

    /// Replaces every tensor, in adapter order.
    pub fn set_tensors(&mut self, new: &[Array]) -> R<()> {
        *self = self.with_flat(join(new)?)?;
        Ok(())
    }

    /// `flat` (`[n]`, laid out as [`Params::flat`]: gradients, AdamW's moments) as one view a
    /// tensor, in adapter order.
    pub fn split(&self, flat: &Array) -> R<Vec<Array>> {
        let mut start = 0;
        self.shapes
            .iter()
            .map(|&[r, c]| {
                let view = flat.try_index(start..start + r * c)?.reshape(&[r, c]);
                start += r * c;
                view
            })
            .collect()
    }
}

/// `tensors` flattened and joined in their order, `[n]` f32: one concatenation in their dtype,
/// then one cast (MLX's concatenation casts each input to the result's dtype first).
pub fn join(tensors: &[Array]) -> R<Array> {
    if tensors.is_empty() {
        return mlx_rs::ops::zeros_dtype(&[0], Dtype::Float32);
    }
    let flat = tensors
        .iter()
        .map(|t| t.reshape(&[-1]))
        .collect::<R<Vec<_>>>()?;
    mlx_rs::ops::concatenate(&flat, 0)?.as_dtype(Dtype::Float32)
}

/// The pairs over `flat`, tensors of `shapes` in adapter order, blocks' targets by `slots`.
fn pairs_of(flat: &Array, shapes: &[[i32; 2]], slots: &[[bool; 7]]) -> R<Vec<BlockPairs>> {
    let mut start = 0;
    let mut at = 0;
    let mut next = || -> R<Array> {
        let [r, c] = *shapes
            .get(at)
            .ok_or_else(|| Exception::custom("the adapter has fewer tensors than its pairs"))?;
        let view = flat.try_index(start..start + r * c)?.reshape(&[r, c])?;
        start += r * c;
        at += 1;
        Ok(view)
    };
    slots
        .iter()
        .map(|present| {
            let mut out: BlockPairs = Default::default();
            for (slot, here) in out.iter_mut().zip(present) {
                if *here {
                    *slot = Some((next()?, next()?));
                }
            }
            Ok(out)
        })
        .collect()
}

/// Block `layer`'s pairs, rebuilt from its flattened tensors (`A, B` per pair present, in target
/// order) as the differentiated block function receives them.
pub fn unflatten<'a>(
    present: &[bool; 7],
    flat: &'a [Array],
) -> [Option<(&'a Array, &'a Array)>; 7] {
    let mut out: [Option<(&Array, &Array)>; 7] = Default::default();
    let mut it = flat.iter();
    for t in Target::ALL {
        if present[t.index()] {
            if let (Some(a), Some(b)) = (it.next(), it.next()) {
                out[t.index()] = Some((a, b));
            }
        }
    }
    out
}

/// Which targets of block `layer` carry a pair.
pub fn present(params: &Params, layer: usize) -> [bool; 7] {
    let mut p = [false; 7];
    for (i, slot) in params.pairs[layer].iter().enumerate() {
        p[i] = slot.is_some();
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::mlx::graph;

    /// bf16 gradients join into one f32 vector with one concatenation and one cast, not a
    /// cast apiece.
    #[test]
    fn join_converts_as_it_copies() -> R<()> {
        let _serial = super::super::checks::serial();
        let a = Array::from_slice(&[1.5f32, -2.0, 3.25, 0.5], &[2, 2]).as_dtype(Dtype::Bfloat16)?;
        let b = Array::from_slice(&[7.0f32, 8.0], &[1, 2]).as_dtype(Dtype::Bfloat16)?;
        mlx_rs::transforms::eval([&a, &b])?;
        let flat = join(&[a, b])?;
        let nodes = graph::census(&graph::print(&[&flat])?);
        assert_eq!(nodes.get("Concatenate"), Some(&1), "{nodes:?}");
        assert_eq!(nodes.get("AsType"), Some(&1), "{nodes:?}");
        assert_eq!(flat.dtype(), Dtype::Float32);
        flat.eval()?;
        assert_eq!(flat.as_slice::<f32>(), [1.5, -2.0, 3.25, 0.5, 7.0, 8.0]);
        Ok(())
    }
}
