//! The transformer block, written once for inference and training, with its backward beside
//! it: input RMSNorm → q/k/v projections (with LoRA) → RoPE → attention → output projection +
//! residual → post RMSNorm → MLP (SwiGLU, in row chunks) + residual.
//!
//! What differs between the two uses is the attention, an [`Attend`] strategy (whole
//! sequences that keep their activations for training, [`Sequences`]; new positions appended
//! to a KV cache for inference, [`Cached`]), and what a call keeps ([`Pass`]). Nothing here
//! builds an autograd graph, so candle's backward-less fused kernels are safe to use; every
//! backward formula is checked against candle's autograd over composite ops and against
//! finite differences in the tests.

use crate::model::llama::{KvCache, Llama};
use crate::model::lora::Target;
use crate::model::ops::attention::{self, Attend, Cached, Sequences};
use crate::model::ops::linear::{GradSink, InputGrad, LinearInput, Lora, Projected};
use crate::model::ops::rms_norm::{rms_norm, rms_norm_backward_add};
use crate::model::ops::swiglu::{swiglu, swiglu_backward};
use crate::model::ops::{cat_rows, mask, row_chunks, Heads};
use crate::model::ModelConfig;
use candle_core::{Result, Tensor};

/// One block in a pass: the model, the block's LoRA side (which names the block) and the MLP's
/// rows per chunk.
pub struct Layer<'a> {
    pub model: &'a Llama,
    pub lora: Lora<'a>,
    pub mlp_chunk: usize,
}

/// What [`forward`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The block's output only (inference, and the forward of a block recomputed later).
    Output,
    /// The output and what the backward needs (a kept block).
    OutputAndSaved,
    /// What the backward needs only (the recompute): the MLP, which only the output needs,
    /// is skipped.
    Saved,
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
    /// What attention's backward needs: rotated q, k, v and the probabilities (or lse).
    attention: attention::Saved,
    /// Attention's output.
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

/// One block on `x` (`[rows, H]`): its output and/or the activations for the backward.
pub fn forward(
    cx: &Layer,
    x: &Tensor,
    attn: &mut dyn Attend,
    pass: Pass,
) -> Result<(Option<Tensor>, Option<Saved>)> {
    let cfg = &cx.model.cfg;
    let blk = &cx.model.blocks[cx.lora.layer];
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let eps = cfg.rms_norm_eps as f32;
    let keep = pass != Pass::Output;
    let mut xa: [Option<Tensor>; 7] = Default::default();
    let mut dropped: [Option<Tensor>; 7] = Default::default();
    let mut proj = |lin, input: &Tensor, target: Target| -> Result<Tensor> {
        let p = cx.lora.project(lin, target, input, 0)?;
        if keep {
            xa[target.index()] = p.xa;
            dropped[target.index()] = p.dropped;
        }
        Ok(p.y)
    };
    let h1 = rms_norm(x, &blk.input_norm, eps)?;

    // The un-rotated q and k are temporaries: only the rotated ones are kept.
    let q = attn.rope(&proj(&blk.q_proj, &h1, Target::Q)?, nh)?;
    let k = attn.rope(&proj(&blk.k_proj, &h1, Target::K)?, nkv)?;
    let v = proj(&blk.v_proj, &h1, Target::V)?;
    let (out, attention) = attn.attend(q, k, v, keep)?;
    let xmid = (x + proj(&blk.o_proj, &out, Target::O)?)?;
    let h2 = rms_norm(&xmid, &blk.post_norm, eps)?;

    let (y, mlp) = match pass {
        Pass::Saved => (None, None),
        Pass::Output | Pass::OutputAndSaved => {
            let (y, mlp) = mlp_forward(cx, &xmid, &h2, pass == Pass::OutputAndSaved)?;
            (Some(y), mlp)
        }
    };
    let saved = match attention {
        Some(attention) if keep => Some(Saved {
            x: x.clone(),
            h1,
            xa,
            dropped,
            attention,
            attn: out,
            xmid,
            h2,
            mlp,
        }),
        _ if keep => candle_core::bail!("the attention kept nothing for the backward"),
        _ => None,
    };
    Ok((y, saved))
}

/// `xmid + down(silu(gate(h2)) · up(h2))`, in row chunks; with `keep`, also each chunk's gate
/// and up projections (a kept block: its backward then recomputes only the activation).
fn mlp_forward(
    cx: &Layer,
    xmid: &Tensor,
    h2: &Tensor,
    keep: bool,
) -> Result<(Tensor, Option<Vec<MlpChunk>>)> {
    let blk = &cx.model.blocks[cx.lora.layer];
    let lora = &cx.lora;
    let mut parts = vec![];
    let mut kept = vec![];
    for (r0, n) in row_chunks(h2.dim(0)?, cx.mlp_chunk) {
        let h2c = h2.narrow(0, r0, n)?;
        let gate = lora.project(&blk.gate_proj, Target::Gate, &h2c, r0)?;
        let up = lora.project(&blk.up_proj, Target::Up, &h2c, r0)?;
        let act = swiglu(&gate.y, &up.y)?;
        if keep {
            kept.push(MlpChunk { gate, up });
        } else {
            drop((gate, up));
        }
        let down = lora.project(&blk.down_proj, Target::Down, &act, r0)?.y;
        parts.push((xmid.narrow(0, r0, n)? + down)?);
    }
    Ok((cat_rows(parts)?, keep.then_some(kept)))
}

/// Backward of one block: hands its LoRA gradients to `grads` and returns `∂loss/∂x` when
/// `need_dx` (the block below still needs it; else `∂loss/∂xmid`).
pub fn backward<'a>(
    cx: &Layer,
    s: &'a Saved,
    dout: &Tensor,
    attn: &mut Sequences,
    grads: &mut GradSink<'_>,
    need_dx: bool,
) -> Result<Tensor> {
    let cfg = &cx.model.cfg;
    let blk = &cx.model.blocks[cx.lora.layer];
    let lora = &cx.lora;
    let eps = cfg.rms_norm_eps;
    // MLP: out = xmid + down(silu(gate) · up), recomputed (from the kept gate and up, in a
    // kept block) and differentiated one row chunk at a time, so only dxmid outlives a
    // chunk's `[chunk, intermediate]` temporaries.
    let dxmid = {
        let mut parts = vec![];
        for (i, (r0, n)) in row_chunks(s.h2.dim(0)?, cx.mlp_chunk).enumerate() {
            let h2 = s.h2.narrow(0, r0, n)?;
            let dout = dout.narrow(0, r0, n)?;
            let (gate, up) = match s.mlp.as_ref().and_then(|k| k.get(i)) {
                Some(k) => (k.gate.clone(), k.up.clone()),
                None => (
                    lora.project(&blk.gate_proj, Target::Gate, &h2, r0)?,
                    lora.project(&blk.up_proj, Target::Up, &h2, r0)?,
                ),
            };
            let act = swiglu(&gate.y, &up.y)?;
            let act_dims = act.dims().to_vec();
            // Only `x' Aᵀ` of the down projection is needed: its output is not.
            let down_x = lora.dropped(Target::Down, &act, r0)?;
            let down_xa = lora.xa(Target::Down, down_x.as_ref().unwrap_or(&act))?;
            let mut dact = InputGrad::Empty;
            lora.backward(
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
            lora.backward(
                grads,
                &blk.gate_proj,
                Target::Gate,
                (&h2, gate.dropped.as_ref(), gate.xa.as_ref(), r0),
                &dgate,
                Some(&mut dh2),
            )?;
            drop(dgate);
            lora.backward(
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
        let i = target.index();
        (input, s.dropped[i].as_ref(), s.xa[i].as_ref(), 0)
    };
    // Attention: xmid = x + o(attn).
    let mut dattn = InputGrad::Empty;
    lora.backward(
        grads,
        &blk.o_proj,
        Target::O,
        saved_input(&s.attn, Target::O),
        &dxmid,
        Some(&mut dattn),
    )?;
    let dattn = dattn.into_tensor(s.attn.dims())?;
    let (dq, dk, dv) = attn.backward(&s.attention, &s.attn, &dattn)?;
    drop(dattn);
    let mut dh1 = InputGrad::wanted(need_dx);
    for (lin, target, dy) in [
        (&blk.q_proj, Target::Q, &dq),
        (&blk.k_proj, Target::K, &dk),
        (&blk.v_proj, Target::V, &dv),
    ] {
        let dx = need_dx.then_some(&mut dh1);
        lora.backward(grads, lin, target, saved_input(&s.h1, target), dy, dx)?;
    }

    if !need_dx {
        return Ok(dxmid);
    }
    let dh1 = dh1.into_tensor(s.h1.dims())?;
    rms_norm_backward_add(&s.x, &blk.input_norm, &dh1, eps, &dxmid)
}

/// Bytes one `[chunk, intermediate]` MLP activation may take: the MLP runs in row chunks so
/// that its `[rows, intermediate]` temporaries (six or more alive at once in its backward,
/// 0.37 GB at Llama-8B shapes and length 2048 in bf16) are never whole.
pub const MLP_CHUNK_BYTES: usize = 16 << 20;
/// Fewer rows than this per chunk would make the GEMMs (and a quantized weight's
/// dequantization, once per chunk) less efficient than the memory is worth.
const MLP_CHUNK_MIN_ROWS: usize = 256;

/// Rows per MLP chunk for `rows` positions in training: chunks of equal size, each `[chunk,
/// intermediate]` tensor within [`MLP_CHUNK_BYTES`] (at least [`MLP_CHUNK_MIN_ROWS`] rows).
pub fn mlp_chunk_rows(rows: usize, intermediate: usize, act_bytes: usize) -> usize {
    let max = (MLP_CHUNK_BYTES / (intermediate * act_bytes).max(1)).max(MLP_CHUNK_MIN_ROWS);
    let chunks = rows.div_ceil(max).max(1);
    rows.div_ceil(chunks).max(1)
}

/// Bytes one block keeps for its backward, for `rows` positions of sequences of length `t`:
/// what [`Saved`] holds, in f32 (the MLP's activations are not kept: its backward recomputes
/// them chunk by chunk). `probs`: attention keeps its probabilities (the fused CPU
/// kernels) rather than a log-sum-exp per row (the composite path).
pub fn saved_bytes_per_block(
    cfg: &ModelConfig,
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
pub fn kept_mlp_bytes_per_block(cfg: &ModelConfig, rank: usize, rows: usize) -> usize {
    4 * rows * (2 * cfg.intermediate_size + 2 * rank)
}

impl Llama {
    /// The last hidden states before the final norm, `[b·t, hidden]`, for `ids` `[b, t]`
    /// following the positions already in `cache` (which takes the new ones): every block's
    /// [`forward`] with the inference attention, the model's adapter applied.
    pub fn hidden_states(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let offset = cache.len();
        let (cos, sin) = self.rope.cos_sin_range(offset, t, self.dtype)?;
        let mask = mask::causal(t, offset, cfg.sliding_window, &self.device)?;
        let heads = Heads {
            b,
            t,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            d: cfg.head_dim,
        };
        let mut x = self.embed(ids)?.reshape((b * t, cfg.hidden_size))?;
        let (decode, store) = (cache.decoding(), cache.store());
        for (layer, slot) in cache.slots(self.blocks.len()).iter_mut().enumerate() {
            let cx = Layer {
                model: self,
                lora: Lora {
                    adapter: self.adapter.as_ref(),
                    layer,
                    dropout: None,
                    decode,
                },
                // One chunk: inference's MLP runs on all its rows at once.
                mlp_chunk: usize::MAX,
            };
            let mut attn = Cached {
                cos: &cos,
                sin: &sin,
                mask: mask.as_ref(),
                cache: slot,
                store,
                heads,
            };
            x = forward(&cx, &x, &mut attn, Pass::Output)?
                .0
                .expect("the output was asked for");
        }
        Ok(x)
    }

    /// Final hidden states (after the last RMSNorm), `[b, t, hidden]`, for `ids` `[b, t]`
    /// following the positions already in `cache`.
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.hidden_states(ids, cache)?;
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))
    }

    /// Logits `[b, t, vocab]` (in f32).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        self.logits(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
