//! The memory-flat training step: a block-wise forward that keeps only each block's input, a
//! chunked LM head with cross-entropy whose gradient is formed directly (softmax − one-hot),
//! then, block by block from the top, a recomputed forward and the hand-written backward. The
//! block and the head themselves are [`crate::model::block`] and [`crate::model::ops::head`];
//! this is the loop over them, with the gradients it fills and the phases it times.

use crate::engine::StepError;
use crate::model::block::{self, mlp_chunk_rows, Layer, Pass, Saved};
use crate::model::lora::{Adapter, Target};
use crate::model::ops::attention::Sequences;
use crate::model::ops::head::{head, Targets};
use crate::model::ops::linear::Lora;
use crate::model::ops::Heads;
use crate::model::Llama;
use crate::runtime::memory::Meter;
use candle_core::{Result, Tensor};
use std::time::{Duration, Instant};

pub use crate::model::ops::head::LossSums;

/// One micro-batch, laid out for the step.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// `[B, T]` token ids (u32), right-padded.
    pub ids: Tensor,
    /// RoPE tables: `[T, d/2]`, or `[B, T, d/2]` when packed documents restart positions.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive attention mask, `[1, 1, 1, T, T]` or `[B, 1, 1, T, T]` (per-document when
    /// packed), within the model's sliding window when it has one.
    pub mask: Tensor,
    /// Rows of the flattened `[B·T]` positions whose next token is scored (u32, ascending).
    pub target_rows: Tensor,
    /// The token each scored row must predict (u32).
    pub target_ids: Tensor,
    /// Loss weight of each scored row (f32; 1 for plain training).
    pub target_weights: Tensor,
    pub n_targets: usize,
    /// Real (non-padding) tokens.
    pub n_tokens: usize,
    /// LoRA dropout: probability and the seed its masks derive from (the same masks are drawn
    /// again when a block is recomputed for the backward).
    pub dropout: Option<(f64, u64)>,
    /// Rows per chunk of the MLP (forward and backward); `None`: [`mlp_chunk_rows`] for the
    /// model's shapes. Tests set it to force several chunks on a tiny model.
    pub mlp_chunk_rows: Option<usize>,
}

impl MicroBatch {
    /// Rows per MLP chunk of this batch's `rows` positions.
    fn mlp_chunk(&self, model: &Llama, rows: usize) -> usize {
        self.mlp_chunk_rows.unwrap_or_else(|| {
            mlp_chunk_rows(
                rows,
                model.cfg.intermediate_size,
                model.dtype.size_in_bytes(),
            )
        })
    }

    /// The batch's attention for `model` (RoPE tables, mask and shapes).
    fn attention(&self, model: &Llama) -> Result<Sequences<'_>> {
        let (b, t) = self.ids.dims2()?;
        let c = &model.cfg;
        let heads = Heads {
            b,
            t,
            nh: c.num_attention_heads,
            nkv: c.num_key_value_heads,
            d: c.head_dim,
        };
        Ok(Sequences {
            cos: &self.cos,
            sin: &self.sin,
            mask: &self.mask,
            heads,
            time: Duration::ZERO,
        })
    }

    pub fn targets(&self) -> Targets<'_> {
        Targets {
            rows: &self.target_rows,
            ids: &self.target_ids,
            weights: &self.target_weights,
        }
    }
}

/// Gradients `(dA, dB)` laid out like the adapter.
#[derive(Debug, Clone)]
pub struct Grads {
    pub pairs: Vec<[Option<(Tensor, Tensor)>; 7]>,
    /// Which pairs the adapter has (and so which gradients there will be).
    expected: Vec<[bool; 7]>,
}

impl Grads {
    /// Empty gradients for `adapter`'s pairs. A pair's gradient starts as its first
    /// contribution rather than as zeros plus it: a zeroed copy of every gradient would be
    /// resident for the whole backward (measured: +60 MB at rank 64 on SmolLM2).
    pub fn new(adapter: &Adapter) -> Self {
        let mut expected = vec![[false; 7]; adapter.pairs.len()];
        for (l, t, _) in adapter.iter() {
            expected[l][t.index()] = true;
        }
        Self {
            pairs: adapter.pairs.iter().map(|_| Default::default()).collect(),
            expected,
        }
    }

    /// Zero gradients for the pairs that received none (before clipping and the update, which
    /// walk every pair in adapter order).
    pub fn fill_missing(&mut self, adapter: &Adapter) -> Result<()> {
        for (l, t, p) in adapter.iter() {
            let slot = &mut self.pairs[l][t.index()];
            if slot.is_none() {
                *slot = Some((p.a.zeros_like()?, p.b.zeros_like()?));
            }
        }
        Ok(())
    }

    fn add(&mut self, layer: usize, t: Target, da: &Tensor, db: &Tensor) -> Result<()> {
        if !self.expected[layer][t.index()] {
            return Ok(());
        }
        let slot = &mut self.pairs[layer][t.index()];
        *slot = Some(match slot.take() {
            Some((ga, gb)) => ((ga + da)?, (gb + db)?),
            None => (da.clone(), db.clone()),
        });
        Ok(())
    }

    /// Every gradient tensor, A then B per pair, in adapter order.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.pairs
            .iter()
            .flatten()
            .flatten()
            .flat_map(|(a, b)| [a, b])
    }

    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.pairs
            .iter_mut()
            .flatten()
            .flatten()
            .flat_map(|(a, b)| [a, b])
    }
}

/// Time spent in each phase of the step, summed over steps (`train --profile`).
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub data: Duration,
    pub forward: Duration,
    pub head: Duration,
    pub recompute: Duration,
    pub backward: Duration,
    pub optimizer: Duration,
    pub eval: Duration,
    /// Attention alone (scores, softmax, weighted sum, forward and backward): a part of the
    /// block phases, shown apart because it grows with the square of the length.
    pub attention: Duration,
}

impl Profile {
    /// The phases as `(name, seconds)`, in step order.
    pub fn phases(&self) -> [(&'static str, f64); 7] {
        [
            ("data and batching", self.data.as_secs_f64()),
            ("forward (blocks)", self.forward.as_secs_f64()),
            ("LM head + loss + its backward", self.head.as_secs_f64()),
            ("recompute (blocks)", self.recompute.as_secs_f64()),
            ("backward (blocks)", self.backward.as_secs_f64()),
            ("optimizer (clip + AdamW)", self.optimizer.as_secs_f64()),
            ("evaluation", self.eval.as_secs_f64()),
        ]
    }
}

/// The training step of one model and adapter.
pub struct Step<'a> {
    pub model: &'a Llama,
    pub adapter: &'a Adapter,
    /// Adapted blocks (the top ones) that keep their activations from the forward; the others
    /// keep only their input and are recomputed in the backward (the result is the same, bit
    /// for bit: the recompute runs the same kernels on the same input).
    pub keep_blocks: usize,
    /// Checked between blocks: the step is abandoned when it crosses its limit.
    pub meter: &'a Meter,
}

impl Step<'_> {
    /// Runs forward and backward on `mb`, adding `loss_scale · ∂(Σ wᵢ·CEᵢ)/∂θ` into `grads`.
    pub fn forward_backward(
        &self,
        mb: &MicroBatch,
        loss_scale: f64,
        grads: &mut Grads,
        profile: &mut Profile,
    ) -> std::result::Result<LossSums, StepError> {
        let targets = mb.targets();
        let model = self.model;
        self.forward_backward_with(
            mb,
            |x| {
                let (sums, dx) = head(model, x, &targets, Some(loss_scale))?;
                Ok((sums, dx.expect("the gradient was asked for")))
            },
            grads,
            profile,
        )
    }

    /// [`Step::forward_backward`] with another loss on the last hidden states: `loss` takes
    /// them (`[B·T, H]`, before the final norm) and returns what it computed and `∂loss/∂x`.
    pub fn forward_backward_with<R>(
        &self,
        mb: &MicroBatch,
        loss: impl FnOnce(&Tensor) -> Result<(R, Tensor)>,
        grads: &mut Grads,
        profile: &mut Profile,
    ) -> std::result::Result<R, StepError> {
        forward_backward(self, mb, loss, grads, profile)
    }

    /// The last hidden states (`[B·T, H]`, before the final norm) of `mb` with `adapter`
    /// (None: the base model), keeping nothing for a backward: each block's input is dropped
    /// as the next is computed. The preference objectives' scoring passes.
    pub fn hidden(&self, mb: &MicroBatch, adapter: Option<&Adapter>) -> Result<Tensor> {
        hidden(self.model, mb, adapter)
    }
}

/// See [`Step::hidden`].
pub fn hidden(model: &Llama, mb: &MicroBatch, adapter: Option<&Adapter>) -> Result<Tensor> {
    let (b, t) = mb.ids.dims2()?;
    let mlp_chunk = mb.mlp_chunk(model, b * t);
    let mut attn = mb.attention(model)?;
    let mut x = model
        .embed(&mb.ids)?
        .reshape((b * t, model.cfg.hidden_size))?;
    for l in 0..model.blocks.len() {
        let layer = Layer {
            model,
            lora: Lora {
                adapter,
                layer: l,
                dropout: None,
                decode: false,
            },
            mlp_chunk,
        };
        x = block::forward(&layer, &x, &mut attn, Pass::Output)?
            .0
            .expect("the output was asked for");
    }
    Ok(x)
}

fn forward_backward<R>(
    step: &Step,
    mb: &MicroBatch,
    loss: impl FnOnce(&Tensor) -> Result<(R, Tensor)>,
    grads: &mut Grads,
    profile: &mut Profile,
) -> std::result::Result<R, StepError> {
    let Step {
        model,
        adapter,
        keep_blocks,
        meter,
    } = *step;
    let cfg = &model.cfg;
    let (b, t) = mb.ids.dims2()?;
    let layers = model.blocks.len();
    // The backward stops at the lowest block that carries an adapter.
    let lowest = adapter.cfg.layers.first().copied().unwrap_or(layers);
    let kept_from = layers.saturating_sub(keep_blocks).max(lowest);
    let mlp_chunk = mb.mlp_chunk(model, b * t);
    let layer = |l: usize| Layer {
        model,
        lora: Lora {
            adapter: Some(adapter),
            layer: l,
            dropout: mb.dropout,
            decode: false,
        },
        mlp_chunk,
    };
    let mut attn = mb.attention(model)?;
    let clock = Instant::now();
    let mut x = model.embed(&mb.ids)?.reshape((b * t, cfg.hidden_size))?;
    let mut inputs = Vec::with_capacity(layers - lowest);
    let mut kept: Vec<Saved> = Vec::with_capacity(layers - kept_from);
    for l in 0..layers {
        let pass = if l >= kept_from {
            Pass::OutputAndSaved
        } else {
            Pass::Output
        };
        if l >= lowest && pass == Pass::Output {
            inputs.push(x.clone());
        }
        let (out, saved) = block::forward(&layer(l), &x, &mut attn, pass)?;
        kept.extend(saved);
        x = out.expect("the output was asked for");
        if let Err(e) = may_go_on(meter) {
            profile.attention += attn.time;
            return Err(e);
        }
    }
    profile.forward += clock.elapsed();
    let clock = Instant::now();
    let (sums, mut dx) = loss(&x)?;
    drop(x);
    profile.head += clock.elapsed();
    for l in (lowest..layers).rev() {
        let saved = match kept.pop() {
            Some(s) => s,
            None => {
                let input = inputs.pop().expect("one saved input per block");
                let clock = Instant::now();
                let (_, saved) = block::forward(&layer(l), &input, &mut attn, Pass::Saved)?;
                profile.recompute += clock.elapsed();
                saved.expect("activations were asked for")
            }
        };
        let clock = Instant::now();
        let mut sink = |t: Target, da: &Tensor, db: &Tensor| grads.add(l, t, da, db);
        dx = block::backward(&layer(l), &saved, &dx, &mut attn, &mut sink, l > lowest)?;
        profile.backward += clock.elapsed();
        if let Err(e) = may_go_on(meter) {
            profile.attention += attn.time;
            return Err(e);
        }
    }
    profile.attention += attn.time;
    Ok(sums)
}

/// Checked between blocks: over the memory budget, or asked to stop by a signal, the step is
/// abandoned (the trainer saves the step before it and stops cleanly), so a stop is honoured
/// within one block's work.
fn may_go_on(meter: &Meter) -> std::result::Result<(), StepError> {
    if let Some(peak) = meter.over_limit() {
        return Err(StepError::OverBudget { peak });
    }
    match crate::runtime::signals::requested() {
        Some(signal) => Err(StepError::Stopped { signal }),
        None => Ok(()),
    }
}
