//! The adapter being trained, as MLX arrays (f32 always): its pairs by block and target, and its
//! tensors flattened in the adapter's own order (A then B of each pair, in
//! [`Adapter::iter`] order), which is also the order of gradients and optimizer moments.

use super::convert::{to_array, to_tensor};
use crate::error::Result;
use crate::model::lora::{Adapter, LoraConfig, LoraPair, Target};
use mlx_rs::{Array, Dtype};

pub struct Params {
    pub cfg: LoraConfig,
    /// `[block][target]`: `(A [r, in], B [out, r])`.
    pub pairs: Vec<[Option<(Array, Array)>; 7]>,
}

impl Params {
    pub fn from_adapter(a: &Adapter) -> Result<Self> {
        let pairs = a
            .pairs
            .iter()
            .map(|ps| -> Result<[Option<(Array, Array)>; 7]> {
                let mut out: [Option<(Array, Array)>; 7] = Default::default();
                for t in Target::ALL {
                    if let Some(p) = &ps[t.index()] {
                        out[t.index()] = Some((
                            to_array(&p.a, Dtype::Float32)?,
                            to_array(&p.b, Dtype::Float32)?,
                        ));
                    }
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: a.cfg.clone(),
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

    /// The adapter in `dtype` (the same arrays when it is already f32 and `dtype` is f32).
    pub fn cast(&self, dtype: Dtype) -> Result<Self, mlx_rs::error::Exception> {
        let pairs = self
            .pairs
            .iter()
            .map(|ps| {
                let mut out: [Option<(Array, Array)>; 7] = Default::default();
                for (slot, p) in out.iter_mut().zip(ps) {
                    if let Some((a, b)) = p {
                        *slot = Some((a.as_dtype(dtype)?, b.as_dtype(dtype)?));
                    }
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>, mlx_rs::error::Exception>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            pairs,
        })
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
    pub fn set_tensors(&mut self, mut new: impl Iterator<Item = Array>) {
        for (a, b) in self.pairs.iter_mut().flatten().flatten() {
            if let (Some(na), Some(nb)) = (new.next(), new.next()) {
                *a = na;
                *b = nb;
            }
        }
    }
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
