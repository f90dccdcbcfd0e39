//! The memory-flat training step: a block-wise forward that keeps only each block's input, a
//! chunked LM head with cross-entropy whose gradient is formed directly (softmax − one-hot),
//! then, block by block from the top, a recomputed forward and a hand-written backward.
//!
//! Frozen weights only ever see `dX = dY · W`; LoRA pairs get `dA`, `dB`. Nothing here builds an
//! autograd graph, so candle's fused kernels (which have no backward) are safe to use; every
//! backward formula is checked against candle's autograd over composite ops and against
//! finite differences in the tests.

use super::attention;
use crate::lora::{Adapter, LoraPair, Target};
use crate::model::llama::{rms_norm, Linear};
use crate::model::Llama;
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

/// Runs forward and backward on `mb`, adding `loss_scale · ∂(Σ wᵢ·CEᵢ)/∂θ` into `grads`.
///
/// The top `keep_blocks` adapted blocks keep their activations from the forward; the others
/// keep only their input and are recomputed in the backward (the result is the same, bit for
/// bit: the recompute runs the same kernels on the same input).
pub fn forward_backward(
    model: &Llama,
    adapter: &Adapter,
    mb: &MicroBatch,
    loss_scale: f64,
    grads: &mut Grads,
    keep_blocks: usize,
    profile: &mut Profile,
) -> Result<LossSums> {
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
            let (out, saved) = block_forward(model, adapter, l, &x, mb, true)?;
            kept.push(saved.expect("activations were asked for"));
            x = out;
            continue;
        }
        if l >= lowest {
            inputs.push(x.clone());
        }
        x = block_forward(model, adapter, l, &x, mb, false)?.0;
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
                let (_, saved) = block_forward(model, adapter, l, &input, mb, true)?;
                profile.recompute += clock.elapsed();
                saved.expect("activations were asked for")
            }
        };
        let clock = Instant::now();
        dx = block_backward(model, adapter, l, &saved, &dx, mb, grads, l > lowest)?;
        profile.backward += clock.elapsed();
        if let Some(peak) = crate::memory::over_limit() {
            // The trainer sees the same over_limit() and stops cleanly with a checkpoint.
            candle_core::bail!("memory budget crossed: peak {peak} bytes");
        }
    }
    profile.attention += attention::take_time();
    Ok(sums)
}

/// Bytes one block keeps for its backward, for `rows` positions of sequences of length `t`:
/// what [`Saved`] holds, in f32. `probs`: attention keeps its probabilities (the fused CPU
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
        + 3 * cfg.intermediate_size // gate, up, act
        + 7 * rank; // x·Aᵀ of each LoRA pair
    4 * rows * per_row
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

/// What the backward of one block needs from its forward.
pub struct Saved {
    x: Tensor,
    h1: Tensor,
    /// `x Aᵀ` of each LoRA pair, by target.
    xa: [Option<Tensor>; 7],
    /// The dropped-out LoRA input of each pair, when dropout is on.
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
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

/// One block on `x` (`[B·T, H]`); with `keep`, also the activations for the backward.
pub fn block_forward(
    model: &Llama,
    adapter: &Adapter,
    layer: usize,
    x: &Tensor,
    mb: &MicroBatch,
    keep: bool,
) -> Result<(Tensor, Option<Saved>)> {
    let cfg = &model.cfg;
    let blk = &model.blocks[layer];
    let heads = attention::heads(model, mb)?;
    let (nh, nkv) = (heads.nh, heads.nkv);
    let eps = cfg.rms_norm_eps as f32;
    let scale = adapter.cfg.scale();
    let mut xa: [Option<Tensor>; 7] = Default::default();
    let mut dropped: [Option<Tensor>; 7] = Default::default();
    let mut proj = |lin: &Linear, input: &Tensor, target: Target| -> Result<Tensor> {
        let pair = adapter.get(layer, target);
        let lora_x = match (pair, mb.dropout) {
            (Some(_), Some((p, seed))) if p > 0.0 => {
                let (rows, cols) = input.dims2()?;
                let mask = dropout_mask(p, seed, layer, target, rows, cols, input)?;
                Some(input.broadcast_mul(&mask)?)
            }
            _ => None,
        };
        let (y, mid) = lin.forward_lora(input, pair, scale, lora_x.as_ref())?;
        xa[target.index()] = mid;
        dropped[target.index()] = lora_x;
        Ok(y)
    };
    let h1 = rms_norm(x, &blk.input_norm, eps)?;

    // The un-rotated q and k are temporaries: only the rotated ones are kept.
    let q = attention::rope(&proj(&blk.q_proj, &h1, Target::Q)?, mb, heads, nh, false)?;
    let k = attention::rope(&proj(&blk.k_proj, &h1, Target::K)?, mb, heads, nkv, false)?;
    let v = proj(&blk.v_proj, &h1, Target::V)?;
    let (probs, attn) = attention::timed(|| attention::forward(&q, &k, &v, mb, heads))?;
    let xmid = (x + proj(&blk.o_proj, &attn, Target::O)?)?;
    let h2 = rms_norm(&xmid, &blk.post_norm, eps)?;

    let gate = proj(&blk.gate_proj, &h2, Target::Gate)?;
    let up = proj(&blk.up_proj, &h2, Target::Up)?;

    let act = crate::model::llama::swiglu(&gate, &up)?;

    let out = (&xmid + proj(&blk.down_proj, &act, Target::Down)?)?;

    let saved = keep.then(|| Saved {
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
        gate,
        up,
        act,
    });
    Ok((out, saved))
}

/// Backward of one block: adds its LoRA gradients into `grads` and returns `∂loss/∂x` when
/// `need_dx` (the block below still needs it).
#[allow(clippy::too_many_arguments)]
pub fn block_backward(
    model: &Llama,
    adapter: &Adapter,
    layer: usize,
    s: &Saved,
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
    let scale = adapter.cfg.scale();
    // Adds `∂/∂input` into `dx` (when given) and the pair's gradients into `grads`.
    let mut lin_back = |lin: &Linear,
                        target: Target,
                        input: &Tensor,
                        dy: &Tensor,
                        mut dx: Option<&mut InputGrad>|
     -> Result<()> {
        let pair = adapter.get(layer, target);
        let lora_x = s.dropped[target.index()].as_ref();
        let xa = s.xa[target.index()].as_ref();
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
    };
    // MLP: out = xmid + down(silu(gate) · up).
    // Scoped so only dxmid outlives the MLP's `[B·T, intermediate]` temporaries.
    let dxmid = {
        let mut dact = InputGrad::Empty;
        lin_back(&blk.down_proj, Target::Down, &s.act, dout, Some(&mut dact))?;
        let dact = dact.into_tensor(s.act.dims())?;
        let (dgate, dup) = swiglu_backward(&s.gate, &s.up, &dact)?;
        drop(dact);
        let mut dh2 = InputGrad::Empty;
        lin_back(&blk.gate_proj, Target::Gate, &s.h2, &dgate, Some(&mut dh2))?;
        drop(dgate);
        lin_back(&blk.up_proj, Target::Up, &s.h2, &dup, Some(&mut dh2))?;
        let dh2 = dh2.into_tensor(s.h2.dims())?;
        rms_norm_backward_add(&s.xmid, &blk.post_norm, &dh2, eps, dout)?
    };
    // Attention: xmid = x + o(attn).
    let mut dattn = InputGrad::Empty;
    lin_back(&blk.o_proj, Target::O, &s.attn, &dxmid, Some(&mut dattn))?;
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
    let want = need_dx.then_some(());
    lin_back(&blk.q_proj, Target::Q, &s.h1, &dq, want.map(|_| &mut dh1))?;
    lin_back(&blk.k_proj, Target::K, &s.h1, &dk, want.map(|_| &mut dh1))?;
    lin_back(&blk.v_proj, Target::V, &s.h1, &dv, want.map(|_| &mut dh1))?;

    if !need_dx {
        return Ok(dxmid);
    }
    let dh1 = dh1.into_tensor(s.h1.dims())?;
    rms_norm_backward_add(&s.x, &blk.input_norm, &dh1, eps, &dxmid)
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

/// The dropout mask of one LoRA input: entries 0 (probability `p`) or `1/(1−p)`, a pure
/// function of `(seed, layer, target, position)` so the recomputed forward draws it again.
#[allow(clippy::too_many_arguments)]
pub fn dropout_mask(
    p: f64,
    seed: u64,
    layer: usize,
    target: Target,
    rows: usize,
    cols: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let stream = seed ^ ((layer as u64) << 40) ^ ((target.index() as u64) << 56);
    let threshold = (p * (1u64 << 53) as f64) as u64;
    let data: Vec<f32> = (0..(rows * cols) as u64)
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
    Tensor::from_vec(data, (rows, cols), like.device())?.to_dtype(like.dtype())
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
