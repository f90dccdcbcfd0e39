//! The memory-flat training step: a block-wise forward that keeps only each block's input, a
//! chunked LM head with cross-entropy whose gradient is formed directly (softmax − one-hot),
//! then, block by block from the top, a recomputed forward and a hand-written backward.
//!
//! Frozen weights only ever see `dX = dY · W`; LoRA pairs get `dA`, `dB`. Nothing here builds an
//! autograd graph, so candle's fused kernels (which have no backward) are safe to use; every
//! backward formula is checked against candle's autograd over composite ops and against
//! finite differences in the tests.

use super::attention;
use crate::engine::StepError;
use crate::model::llama::{rms_norm, Linear};
use crate::model::lora::{Adapter, LoraPair, Target};
use crate::model::Llama;
use crate::runtime::memory::Meter;
use candle_core::{DType, Result, Tensor, D};
use std::time::{Duration, Instant};

/// Scored positions per LM-head chunk: bounds the `[chunk, vocab]` logits held at once.
pub const HEAD_CHUNK: usize = 256;

/// One micro-batch, laid out for the step.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// `[B, T]` token ids (u32), right-padded.
    pub ids: Tensor,
    /// RoPE tables: `[T, d/2]`, or `[B, T, d/2]` when packed documents restart positions.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive attention mask, `[1, 1, 1, T, T]` or `[B, 1, 1, T, T]` (per-document when packed).
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

/// Bytes one `[chunk, intermediate]` MLP activation may take: the MLP runs in row chunks so
/// that its `[rows, intermediate]` temporaries (six or more alive at once in its backward,
/// 0.37 GB at Llama-8B shapes and length 2048 in bf16) are never whole.
pub const MLP_CHUNK_BYTES: usize = 16 << 20;
/// Fewer rows than this per chunk would make the GEMMs (and a quantized weight's
/// dequantization, once per chunk) less efficient than the memory is worth.
const MLP_CHUNK_MIN_ROWS: usize = 256;

/// Rows per MLP chunk for `rows` positions: chunks of equal size, each `[chunk,
/// intermediate]` tensor within [`MLP_CHUNK_BYTES`] (at least [`MLP_CHUNK_MIN_ROWS`] rows).
pub fn mlp_chunk_rows(rows: usize, intermediate: usize, act_bytes: usize) -> usize {
    let max = (MLP_CHUNK_BYTES / (intermediate * act_bytes).max(1)).max(MLP_CHUNK_MIN_ROWS);
    let chunks = rows.div_ceil(max).max(1);
    rows.div_ceil(chunks).max(1)
}

impl MicroBatch {
    fn mlp_chunk(&self, model: &Llama, rows: usize) -> usize {
        self.mlp_chunk_rows.unwrap_or_else(|| {
            mlp_chunk_rows(
                rows,
                model.cfg.intermediate_size,
                model.dtype.size_in_bytes(),
            )
        })
    }
}

/// Row ranges `(start, len)` of `rows` in chunks of `chunk`.
fn row_chunks(rows: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(chunk.max(1))
        .map(move |r0| (r0, chunk.max(1).min(rows - r0)))
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

/// Losses of one micro-batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossSums {
    /// Σ cross-entropy over scored tokens.
    pub ce: f64,
    /// Σ weight · cross-entropy (equal to `ce` for plain training).
    pub weighted: f64,
    /// Σ weight.
    pub weight: f64,
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
        forward_backward(self, mb, loss_scale, grads, profile)
    }
}

fn forward_backward(
    step: &Step,
    mb: &MicroBatch,
    loss_scale: f64,
    grads: &mut Grads,
    profile: &mut Profile,
) -> std::result::Result<LossSums, StepError> {
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
    let clock = Instant::now();
    let mut x = model.embed(&mb.ids)?.reshape((b * t, cfg.hidden_size))?;
    let mut inputs = Vec::with_capacity(layers - lowest);
    let mut kept: Vec<Saved> = Vec::with_capacity(layers - kept_from);
    for l in 0..layers {
        if l >= kept_from {
            let (out, saved) = block_forward(model, adapter, l, &x, mb, Pass::OutputAndSaved)?;
            kept.push(saved.expect("activations were asked for"));
            x = out.expect("the output was asked for");
            continue;
        }
        if l >= lowest {
            inputs.push(x.clone());
        }
        x = block_forward(model, adapter, l, &x, mb, Pass::Output)?
            .0
            .expect("the output was asked for");
    }
    profile.forward += clock.elapsed();
    let clock = Instant::now();
    let (sums, mut dx) = head_backward(model, &x, mb, loss_scale)?;
    drop(x);
    profile.head += clock.elapsed();
    for l in (lowest..layers).rev() {
        let saved = match kept.pop() {
            Some(s) => s,
            None => {
                let input = inputs.pop().expect("one saved input per block");
                let clock = Instant::now();
                let (_, saved) = block_forward(model, adapter, l, &input, mb, Pass::Saved)?;
                profile.recompute += clock.elapsed();
                saved.expect("activations were asked for")
            }
        };
        let clock = Instant::now();
        dx = block_backward(model, adapter, l, &saved, &dx, mb, grads, l > lowest)?;
        profile.backward += clock.elapsed();
        if let Some(peak) = meter.over_limit() {
            // The trainer saves the step before and stops cleanly.
            return Err(StepError::OverBudget { peak });
        }
    }
    profile.attention += attention::take_time();
    Ok(sums)
}

/// Bytes one block keeps for its backward, for `rows` positions of sequences of length `t`:
/// what [`Saved`] holds, in f32 (the MLP's activations are not kept: its backward recomputes
/// them chunk by chunk). `probs`: attention keeps its probabilities (the fused CPU
/// kernels) rather than a log-sum-exp per row (the composite path).
pub fn saved_bytes_per_block(
    cfg: &crate::model::ModelConfig,
    rank: usize,
    rows: usize,
    t: usize,
    probs: bool,
) -> usize {
    let h = cfg.hidden_size;
    let per_row = 4 * h // x, h1, xmid, h2
        + 2 * cfg.q_size() // q, attn
        + 2 * cfg.kv_size() // k, v
        + cfg.num_attention_heads * if probs { t } else { 1 } // probabilities or log-sum-exp
        + 4 * rank; // x·Aᵀ of each attention LoRA pair (the MLP's are recomputed by chunk)
    4 * rows * per_row
}

/// Bytes a kept block holds besides [`saved_bytes_per_block`]: its MLP gate and up outputs and
/// their pairs' `x·Aᵀ`, in f32.
pub fn kept_mlp_bytes_per_block(
    cfg: &crate::model::ModelConfig,
    rank: usize,
    rows: usize,
) -> usize {
    4 * rows * (2 * cfg.intermediate_size + 2 * rank)
}

/// Final RMSNorm, LM head and cross-entropy on the scored rows of `x` (`[B·T, H]`), in chunks;
/// returns the loss sums and `∂loss/∂x`.
pub fn head_backward(
    model: &Llama,
    x: &Tensor,
    mb: &MicroBatch,
    loss_scale: f64,
) -> Result<(LossSums, Tensor)> {
    let eps = model.cfg.rms_norm_eps;
    let mut sums = LossSums::default();
    let mut dx_rows = vec![];
    let xs = x.index_select(&mb.target_rows, 0)?;
    let targets = mb.target_ids.to_vec1::<u32>()?;
    let weights = mb.target_weights.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut start = 0;
    while start < mb.n_targets {
        let len = HEAD_CHUNK.min(mb.n_targets - start);
        let xc = xs.narrow(0, start, len)?;
        let h = rms_norm(&xc, &model.norm, eps as f32)?;
        let (tg, wc) = (&targets[start..start + len], &weights[start..start + len]);
        let coef: Vec<f32> = wc.iter().map(|&w| (w as f64 * loss_scale) as f32).collect();
        let head = &model.lm_head;
        let fused = crate::kernels::cross_entropy_head_sliced(
            &h,
            &head.slices(),
            |i| head.slice(i, DType::F32),
            tg,
            &coef,
        );
        let dh = match fused {
            Some(done) => {
                let (ce, dh) = done?;
                for (&c, &w) in ce.iter().zip(wc) {
                    sums.ce += c as f64;
                    sums.weighted += c as f64 * w as f64;
                    sums.weight += w as f64;
                }
                dh
            }
            None => {
                let tgt = mb.target_ids.narrow(0, start, len)?.unsqueeze(1)?;
                let w = mb.target_weights.narrow(0, start, len)?;
                head_chunk_composite(model, &h, &tgt, &w, loss_scale, &mut sums)?
            }
        };
        drop(h);
        dx_rows.push(rms_norm_backward(&xc, &model.norm, &dh, eps)?);
        start += len;
    }
    let dx = x.zeros_like()?;
    let dx = if dx_rows.is_empty() {
        dx
    } else {
        dx.index_add(&mb.target_rows, &Tensor::cat(&dx_rows, 0)?, 0)?
    };
    Ok((sums, dx))
}

/// One head chunk with candle's ops (other devices and dtypes): adds the chunk's losses into
/// `sums` and returns `∂/∂h` for normed hidden states `h`, targets `tgt` (`[len, 1]`) and loss
/// weights `w`.
fn head_chunk_composite(
    model: &Llama,
    h: &Tensor,
    tgt: &Tensor,
    w: &Tensor,
    loss_scale: f64,
    sums: &mut LossSums,
) -> Result<Tensor> {
    // The loss is accumulated in f32 at least (f64 when the model runs in f64, as tests do).
    let acc = if model.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let len = h.dim(0)?;
    // Each `[chunk, vocab]` temporary is dropped as soon as the next one exists: at most
    // two are alive at once.
    let shifted = {
        let logits = model.lm_head.matmul_t(h)?.to_dtype(acc)?;
        let max = logits.max_keepdim(D::Minus1)?;
        logits.broadcast_sub(&max)?
    };
    let w = w.to_dtype(acc)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let ce = (sum.log()? - shifted.gather(tgt, D::Minus1)?)?.squeeze(1)?;
    drop(shifted);
    sums.ce += ce.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    sums.weighted += (&ce * &w)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    sums.weight += w.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    // d(w·CE)/dlogits = w · (softmax − one-hot).
    let probs = exp.broadcast_div(&sum)?;
    drop(exp);
    let minus_one = Tensor::full(-1f32, (len, 1), probs.device())?.to_dtype(acc)?;
    let dlogits = probs.scatter_add(tgt, &minus_one, 1)?;
    drop(probs);
    let dlogits = dlogits.broadcast_mul(&(w * loss_scale)?.unsqueeze(1)?)?;
    model.lm_head.matmul(&dlogits.to_dtype(model.dtype)?)
}

/// What the backward of one block needs from its forward. A recomputed block does not keep
/// the MLP's activations: its backward recomputes `gate`, `up` and `silu(gate)·up` from `h2`
/// one row chunk at a time (two of the block's seven matmuls again, against three `[rows,
/// intermediate]` tensors per block and the recompute's `down` matmul saved). A kept block
/// keeps gate and up by chunk (the activation is elementwise, cheap to redo).
pub struct Saved {
    x: Tensor,
    h1: Tensor,
    /// `x Aᵀ` of each attention LoRA pair, by target.
    xa: [Option<Tensor>; 7],
    /// The dropped-out LoRA input of each attention pair, when dropout is on.
    dropped: [Option<Tensor>; 7],
    /// Rotated queries `[B·T, nh·d]` and keys, values `[B·T, nkv·d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// What attention's backward needs besides q, k, v and its output.
    probs: attention::Kept,
    attn: Tensor,
    xmid: Tensor,
    h2: Tensor,
    /// A kept block's MLP gate and up projections, by row chunk (recomputed otherwise).
    mlp: Option<Vec<MlpChunk>>,
}

/// The gate and up projections of one MLP row chunk, as a kept block saves them.
struct MlpChunk {
    gate: Projected,
    up: Projected,
}

/// What [`block_forward`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The block's output only (the forward of a block that is recomputed later).
    Output,
    /// The output and what the backward needs (a kept block).
    OutputAndSaved,
    /// What the backward needs only (the recompute): the MLP, which only the output needs,
    /// is skipped.
    Saved,
}

/// One LoRA-carrying projection of `input` (rows `row0..` of the block's rows).
#[derive(Clone)]
struct Projected {
    y: Tensor,
    /// `x' Aᵀ`, when the target has a pair.
    xa: Option<Tensor>,
    /// The dropped-out LoRA input `x'`, when dropout is on.
    dropped: Option<Tensor>,
}

/// The dropped-out LoRA input of `target` for rows `row0..` of `input`, when the target has a
/// pair and dropout is on.
fn lora_dropped(
    adapter: &Adapter,
    layer: usize,
    target: Target,
    input: &Tensor,
    row0: usize,
    mb: &MicroBatch,
) -> Result<Option<Tensor>> {
    match (adapter.get(layer, target), mb.dropout) {
        (Some(_), Some((p, seed))) if p > 0.0 => {
            let (rows, cols) = input.dims2()?;
            let mask = dropout_mask(p, seed, layer, target, row0..row0 + rows, cols, input)?;
            Ok(Some(input.broadcast_mul(&mask)?))
        }
        _ => Ok(None),
    }
}

#[allow(clippy::too_many_arguments)]
fn project(
    adapter: &Adapter,
    layer: usize,
    lin: &Linear,
    target: Target,
    input: &Tensor,
    row0: usize,
    mb: &MicroBatch,
) -> Result<Projected> {
    let dropped = lora_dropped(adapter, layer, target, input, row0, mb)?;
    let pair = adapter.get(layer, target);
    let (y, xa) = lin.forward_lora(input, pair, adapter.cfg.scale(), dropped.as_ref())?;
    Ok(Projected { y, xa, dropped })
}

/// One block on `x` (`[B·T, H]`): its output and/or the activations for the backward.
pub fn block_forward(
    model: &Llama,
    adapter: &Adapter,
    layer: usize,
    x: &Tensor,
    mb: &MicroBatch,
    pass: Pass,
) -> Result<(Option<Tensor>, Option<Saved>)> {
    let cfg = &model.cfg;
    let blk = &model.blocks[layer];
    let heads = attention::heads(model, mb)?;
    let (nh, nkv) = (heads.nh, heads.nkv);
    let eps = cfg.rms_norm_eps as f32;
    let mut xa: [Option<Tensor>; 7] = Default::default();
    let mut dropped: [Option<Tensor>; 7] = Default::default();
    let mut proj = |lin: &Linear, input: &Tensor, target: Target| -> Result<Tensor> {
        let p = project(adapter, layer, lin, target, input, 0, mb)?;
        xa[target.index()] = p.xa;
        dropped[target.index()] = p.dropped;
        Ok(p.y)
    };
    let h1 = rms_norm(x, &blk.input_norm, eps)?;

    // The un-rotated q and k are temporaries: only the rotated ones are kept.
    let q = attention::rope(&proj(&blk.q_proj, &h1, Target::Q)?, mb, heads, nh, false)?;
    let k = attention::rope(&proj(&blk.k_proj, &h1, Target::K)?, mb, heads, nkv, false)?;
    let v = proj(&blk.v_proj, &h1, Target::V)?;
    let (probs, attn) = attention::timed(|| attention::forward(&q, &k, &v, mb, heads))?;
    let xmid = (x + proj(&blk.o_proj, &attn, Target::O)?)?;
    let h2 = rms_norm(&xmid, &blk.post_norm, eps)?;

    let (out, mlp) = match pass {
        Pass::Saved => (None, None),
        Pass::Output | Pass::OutputAndSaved => {
            let keep = pass == Pass::OutputAndSaved;
            let (out, mlp) = mlp_forward(model, adapter, layer, &xmid, &h2, mb, keep)?;
            (Some(out), mlp)
        }
    };
    let saved = (pass != Pass::Output).then(|| Saved {
        x: x.clone(),
        h1,
        xa,
        dropped,
        q,
        k,
        v,
        probs,
        attn,
        xmid,
        h2,
        mlp,
    });
    Ok((out, saved))
}

/// `xmid + down(silu(gate(h2)) · up(h2))`, in row chunks; with `keep`, also each chunk's gate
/// and up projections (a kept block: its backward then recomputes only the activation).
fn mlp_forward(
    model: &Llama,
    adapter: &Adapter,
    layer: usize,
    xmid: &Tensor,
    h2: &Tensor,
    mb: &MicroBatch,
    keep: bool,
) -> Result<(Tensor, Option<Vec<MlpChunk>>)> {
    let blk = &model.blocks[layer];
    let rows = h2.dim(0)?;
    let mut parts = vec![];
    let mut kept = vec![];
    for (r0, n) in row_chunks(rows, mb.mlp_chunk(model, rows)) {
        let h2c = h2.narrow(0, r0, n)?;
        let gate = project(adapter, layer, &blk.gate_proj, Target::Gate, &h2c, r0, mb)?;
        let up = project(adapter, layer, &blk.up_proj, Target::Up, &h2c, r0, mb)?;
        let act = crate::model::llama::swiglu(&gate.y, &up.y)?;
        if keep {
            kept.push(MlpChunk { gate, up });
        } else {
            drop((gate, up));
        }
        let down = project(adapter, layer, &blk.down_proj, Target::Down, &act, r0, mb)?.y;
        parts.push((xmid.narrow(0, r0, n)? + down)?);
    }
    Ok((cat_rows(parts)?, keep.then_some(kept)))
}

/// Row chunks back into one tensor (one chunk is returned as it is).
fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Tensor::cat(&parts, 0)
}

/// Backward of one block: adds its LoRA gradients into `grads` and returns `∂loss/∂x` when
/// `need_dx` (the block below still needs it).
#[allow(clippy::too_many_arguments)]
pub fn block_backward<'a>(
    model: &Llama,
    adapter: &Adapter,
    layer: usize,
    s: &'a Saved,
    dout: &Tensor,
    mb: &MicroBatch,
    grads: &mut Grads,
    need_dx: bool,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let blk = &model.blocks[layer];
    let heads = attention::heads(model, mb)?;
    let (nh, nkv) = (heads.nh, heads.nkv);
    let eps = cfg.rms_norm_eps;
    let back = LinearBack { adapter, layer, mb };
    // MLP: out = xmid + down(silu(gate) · up), recomputed (from the kept gate and up, in a
    // kept block) and differentiated one row chunk at a time, so only dxmid outlives a
    // chunk's `[chunk, intermediate]` temporaries.
    let dxmid = {
        let rows = s.h2.dim(0)?;
        let mut parts = vec![];
        for (i, (r0, n)) in row_chunks(rows, mb.mlp_chunk(model, rows)).enumerate() {
            let h2 = s.h2.narrow(0, r0, n)?;
            let dout = dout.narrow(0, r0, n)?;
            let (gate, up) = match s.mlp.as_ref().and_then(|k| k.get(i)) {
                Some(k) => (k.gate.clone(), k.up.clone()),
                None => (
                    project(adapter, layer, &blk.gate_proj, Target::Gate, &h2, r0, mb)?,
                    project(adapter, layer, &blk.up_proj, Target::Up, &h2, r0, mb)?,
                ),
            };
            let act = crate::model::llama::swiglu(&gate.y, &up.y)?;
            let act_dims = act.dims().to_vec();
            // Only `x' Aᵀ` of the down projection is needed: its output is not.
            let down_x = lora_dropped(adapter, layer, Target::Down, &act, r0, mb)?;
            let down_xa = match adapter.get(layer, Target::Down) {
                Some(p) => Some(
                    down_x
                        .as_ref()
                        .unwrap_or(&act)
                        .to_dtype(p.a.dtype())?
                        .matmul(&p.a.t()?)?,
                ),
                None => None,
            };
            let mut dact = InputGrad::Empty;
            back.run(
                grads,
                &blk.down_proj,
                Target::Down,
                (&act, down_x.as_ref(), down_xa.as_ref(), r0),
                &dout,
                Some(&mut dact),
            )?;
            drop((act, down_x, down_xa));
            let dact = dact.into_tensor(&act_dims)?;
            let (dgate, dup) = swiglu_backward(&gate.y, &up.y, &dact)?;
            drop((dact, gate.y, up.y));
            let mut dh2 = InputGrad::Empty;
            back.run(
                grads,
                &blk.gate_proj,
                Target::Gate,
                (&h2, gate.dropped.as_ref(), gate.xa.as_ref(), r0),
                &dgate,
                Some(&mut dh2),
            )?;
            drop(dgate);
            back.run(
                grads,
                &blk.up_proj,
                Target::Up,
                (&h2, up.dropped.as_ref(), up.xa.as_ref(), r0),
                &dup,
                Some(&mut dh2),
            )?;
            drop(dup);
            let dh2 = dh2.into_tensor(h2.dims())?;
            let xmid = s.xmid.narrow(0, r0, n)?;
            parts.push(rms_norm_backward_add(
                &xmid,
                &blk.post_norm,
                &dh2,
                eps,
                &dout,
            )?);
        }
        cat_rows(parts)?
    };
    let saved_input = |input: &'a Tensor, target: Target| -> LinearInput<'a> {
        (
            input,
            s.dropped[target.index()].as_ref(),
            s.xa[target.index()].as_ref(),
            0,
        )
    };
    // Attention: xmid = x + o(attn).
    let mut dattn = InputGrad::Empty;
    back.run(
        grads,
        &blk.o_proj,
        Target::O,
        saved_input(&s.attn, Target::O),
        &dxmid,
        Some(&mut dattn),
    )?;
    let dattn = dattn.into_tensor(s.attn.dims())?;
    let (dq, dk, dv) = attention::timed(|| {
        attention::backward(&s.q, &s.k, &s.v, &s.probs, &s.attn, &dattn, mb, heads)
    })?;
    drop(dattn);
    // RoPE is a rotation: its backward rotates by the opposite angle.
    let dq = attention::rope(&dq, mb, heads, nh, true)?;
    let dk = attention::rope(&dk, mb, heads, nkv, true)?;
    let mut dh1 = if need_dx {
        InputGrad::Empty
    } else {
        InputGrad::Unused
    };
    for (lin, target, dy) in [
        (&blk.q_proj, Target::Q, &dq),
        (&blk.k_proj, Target::K, &dk),
        (&blk.v_proj, Target::V, &dv),
    ] {
        let dx = need_dx.then_some(&mut dh1);
        back.run(grads, lin, target, saved_input(&s.h1, target), dy, dx)?;
    }

    if !need_dx {
        return Ok(dxmid);
    }
    let dh1 = dh1.into_tensor(s.h1.dims())?;
    rms_norm_backward_add(&s.x, &blk.input_norm, &dh1, eps, &dxmid)
}

/// The backward of one LoRA-carrying linear of a block.
struct LinearBack<'a> {
    adapter: &'a Adapter,
    layer: usize,
    mb: &'a MicroBatch,
}

/// A linear's forward input as its backward needs it: the input, the dropped-out LoRA input
/// (with dropout), `x' Aᵀ`, and the row the input starts at (for the dropout mask).
type LinearInput<'t> = (&'t Tensor, Option<&'t Tensor>, Option<&'t Tensor>, usize);

impl LinearBack<'_> {
    /// Adds `∂/∂input` into `dx` (when given) and the pair's gradients into `grads`.
    fn run(
        &self,
        grads: &mut Grads,
        lin: &Linear,
        target: Target,
        (input, lora_x, xa, row0): LinearInput<'_>,
        dy: &Tensor,
        mut dx: Option<&mut InputGrad>,
    ) -> Result<()> {
        let (layer, mb) = (self.layer, self.mb);
        let pair = self.adapter.get(layer, target);
        let scale = self.adapter.cfg.scale();
        // The fused path: no dropout (its mask would scale the LoRA part of dX alone).
        if lora_x.is_none()
            && crate::kernels::covers(dy)
            && !matches!(dx.as_deref(), Some(InputGrad::Tensor(_)))
        {
            let w = lin.weight.dense(DType::F32)?;
            let lora = match (pair, xa) {
                (Some(p), Some(xa)) => Some((p, scale, input, xa)),
                _ => None,
            };
            let mut fresh = Vec::new();
            let is_fresh = !matches!(dx.as_deref(), Some(InputGrad::Buffer(_)));
            let buf = match dx.as_deref_mut() {
                Some(InputGrad::Buffer(v)) => Some(v),
                Some(_) => Some(&mut fresh),
                None => None,
            };
            if let Some(done) = crate::kernels::linear_backward(&w, dy, lora, buf) {
                if let Some(g) = done? {
                    grads.add(layer, target, &g.da, &g.db)?;
                }
                if let (Some(slot), true) = (dx, is_fresh) {
                    *slot = InputGrad::Buffer(fresh);
                }
                return Ok(());
            }
        }
        let mut d = match dx {
            Some(_) => Some(lin.weight.matmul(dy)?),
            None => None,
        };
        if let (Some(p), Some(xa)) = (pair, xa) {
            let (da, db, dx_lora) =
                lora_backward(p, scale, lora_x.unwrap_or(input), xa, dy, d.is_some())?;
            // Through dropout: the same mask (x'/x is 0 or 1/(1-p)) scales the gradient.
            let dx_lora = match (dx_lora, lora_x, mb.dropout) {
                (Some(d), Some(_), Some((prob, seed))) => {
                    let (rows, cols) = input.dims2()?;
                    let rows = row0..row0 + rows;
                    Some(
                        d.broadcast_mul(&dropout_mask(prob, seed, layer, target, rows, cols, &d)?)?,
                    )
                }
                (d, _, _) => d,
            };
            grads.add(layer, target, &da, &db)?;
            if let (Some(base), Some(extra)) = (d.take(), dx_lora) {
                d = Some((base + extra.to_dtype(dy.dtype())?)?);
            }
        }
        if let (Some(slot), Some(d)) = (dx, d) {
            slot.add(d)?;
        }
        Ok(())
    }
}

/// An input gradient being summed over the layers that read the same input: a plain buffer
/// while the fused kernels fill it, a tensor otherwise.
enum InputGrad {
    Unused,
    Empty,
    Buffer(Vec<f32>),
    Tensor(Tensor),
}

impl InputGrad {
    fn add(&mut self, d: Tensor) -> Result<()> {
        *self = match std::mem::replace(self, InputGrad::Unused) {
            InputGrad::Unused | InputGrad::Empty => InputGrad::Tensor(d),
            InputGrad::Tensor(t) => InputGrad::Tensor((t + d)?),
            InputGrad::Buffer(v) => {
                let t = Tensor::from_vec(v, d.dims(), d.device())?;
                InputGrad::Tensor((t + d)?)
            }
        };
        Ok(())
    }

    fn into_tensor(self, dims: &[usize]) -> Result<Tensor> {
        match self {
            InputGrad::Tensor(t) => Ok(t),
            InputGrad::Buffer(v) => Tensor::from_vec(v, dims, &candle_core::Device::Cpu),
            InputGrad::Unused | InputGrad::Empty => {
                candle_core::bail!("no layer produced this input gradient")
            }
        }
    }
}

/// Gradients `(dgate, dup)` of `silu(gate) · up`.
fn swiglu_backward(gate: &Tensor, up: &Tensor, dact: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(done) = crate::kernels::swiglu_backward(gate, up, dact) {
        return done;
    }
    let sig = candle_nn::ops::sigmoid(gate)?;
    // silu'(g) = σ(g) · (1 + g · (1 − σ(g)))
    let dsilu = (&sig * ((gate * (1.0 - &sig)?)? + 1.0)?)?;
    let dgate = ((dact * up)? * dsilu)?;
    let dup = (dact * (gate * &sig)?)?;
    Ok((dgate, dup))
}

/// `residual + rms_norm_backward(x, w, dy)`.
fn rms_norm_backward_add(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<Tensor> {
    match crate::kernels::rms_norm_backward(x, w, dy, eps, Some(residual)) {
        Some(done) => done,
        None => residual + rms_norm_composite_backward(x, w, dy, eps)?,
    }
}

/// The dropout mask of one LoRA input, for rows `rows` of it: entries 0 (probability `p`) or
/// `1/(1−p)`, a pure function of `(seed, layer, target, position)` so the recomputed forward
/// (and a row chunk of it) draws the same mask again.
#[allow(clippy::too_many_arguments)]
pub fn dropout_mask(
    p: f64,
    seed: u64,
    layer: usize,
    target: Target,
    rows: std::ops::Range<usize>,
    cols: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let stream = seed ^ ((layer as u64) << 40) ^ ((target.index() as u64) << 56);
    let threshold = (p * (1u64 << 53) as f64) as u64;
    let n = rows.len();
    let data: Vec<f32> = ((rows.start * cols) as u64..(rows.end * cols) as u64)
        .map(|i| {
            if splitmix64(stream.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 11
                < threshold
            {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    Tensor::from_vec(data, (n, cols), like.device())?.to_dtype(like.dtype())
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// For `y = s · (x Aᵀ) Bᵀ`: `(dA, dB, dX)` given `xa = x Aᵀ` and `dy`.
fn lora_backward(
    p: &LoraPair,
    scale: f64,
    x: &Tensor,
    xa: &Tensor,
    dy: &Tensor,
    want_dx: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let dt = p.a.dtype();
    let dy = dy.to_dtype(dt)?;
    let db = (dy.t()?.matmul(xa)? * scale)?;
    let dxa = (dy.matmul(&p.b)? * scale)?;
    let da = dxa.t()?.matmul(&x.to_dtype(dt)?)?;
    let dx = if want_dx {
        Some(dxa.matmul(&p.a)?)
    } else {
        None
    };
    Ok((da, db, dx))
}

/// Backward of `y = x · rsqrt(mean(x²) + ε) · w` over the last dimension.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    match crate::kernels::rms_norm_backward(x, w, dy, eps, None) {
        Some(done) => done,
        None => rms_norm_composite_backward(x, w, dy, eps),
    }
}

fn rms_norm_composite_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    let g = dy.broadcast_mul(w)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let gx = (&g * x)?.mean_keepdim(D::Minus1)?;
    let r3 = r.powf(3.0)?;
    g.broadcast_mul(&r)? - x.broadcast_mul(&(r3 * gx)?)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn mlp_chunks_are_even_and_within_the_byte_bound() {
        // Llama-8B in bf16 at length 2048: four chunks of 512 rows (14 MiB each).
        assert_eq!(mlp_chunk_rows(2048, 14336, 2), 512);
        // SmolLM2 in f32: up to 2730 rows stay whole; 8192 rows in four chunks of 2048.
        assert_eq!(mlp_chunk_rows(1024, 1536, 4), 1024);
        assert_eq!(mlp_chunk_rows(8192, 1536, 4), 2048);
        // Never below the minimum, never zero.
        assert_eq!(mlp_chunk_rows(100_000, 1 << 20, 4), 256);
        assert_eq!(mlp_chunk_rows(0, 1536, 4), 1);
        for (rows, chunk) in [(10, 3), (9, 3), (1, 5)] {
            let parts: Vec<_> = row_chunks(rows, chunk).collect();
            assert_eq!(parts.iter().map(|p| p.1).sum::<usize>(), rows);
            assert!(parts.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        }
    }

    #[test]
    fn a_chunk_of_the_dropout_mask_is_that_part_of_the_whole_mask() {
        let like = Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap();
        let whole = dropout_mask(0.4, 7, 3, Target::Down, 0..10, 6, &like).unwrap();
        let part = dropout_mask(0.4, 7, 3, Target::Down, 4..9, 6, &like).unwrap();
        let want = whole.narrow(0, 4, 5).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(part.to_vec2::<f32>().unwrap(), want);
        // About 40% dropped, the rest scaled by 1/(1-p).
        let v = whole.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count();
        assert!((12..=36).contains(&dropped), "{dropped} of 60 dropped");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.6).abs() < 1e-6));
    }
}
