//! The pre-flight estimate for the candle engine (`engine/candle/step.rs`, the block in
//! `model/block.rs`, the head in `model/ops/head.rs`): which tensors are alive at the step's two
//! peaks (the LM head's chunk loop, and a block's backward), on the fused CPU kernels or on
//! candle's composite ops, plus the load before training.

use super::{
    four_terms, frozen_bytes, largest, lora_params, runtime_bytes, Estimate, StepKind,
    WeightFormat, Workload, SLACK,
};
use crate::model::block::{kept_mlp_bytes_per_block, mlp_chunk_rows, saved_bytes_per_block};
use crate::model::lora::Target;
use crate::model::ops::attention::composite_chunk_rows;
use crate::model::ops::head::HEAD_CHUNK;
use crate::model::sliced::SLICE_BYTES;
use crate::model::ModelConfig;

/// The candle engine's step for `w` (whose `step` is one of the candle engine's).
pub fn estimate(cfg: &ModelConfig, w: &Workload) -> Estimate {
    let kernels = w.step == StepKind::Kernels;
    let rows = (w.batch_size * w.seq_len) as u64;
    let t = w.seq_len as u64;
    let act = w.act_bytes as u64;
    let (h, q, kv, i) = (
        cfg.hidden_size as u64,
        cfg.q_size() as u64,
        cfg.kv_size() as u64,
        cfg.intermediate_size as u64,
    );
    let adapted = w.adapted_layers.min(cfg.num_hidden_layers) as u64;
    let keep = (w.keep_blocks as u64).min(adapted);

    let runtime = runtime_bytes(cfg);
    let weights = frozen_bytes(cfg, w.weights);
    let params = lora_params(cfg, w);
    // Parameters and AdamW's two moments, f32, always resident.
    let lora_state = 12 * params;
    // Gradients (f32) are created zeroed each step and become resident block by block as the
    // backward reaches them; all of them by the optimizer's update.
    let grads_per_block = 4 * params / adapted.max(1);
    let input = rows * h * act;
    let inputs = (adapted - keep) * input;
    let per_block =
        saved_bytes_per_block(cfg, w.lora_rank, rows as usize, w.seq_len, kernels) as u64 / 4 * act;
    // With dropout each attention LoRA pair also keeps its masked input (q, k, v: h each;
    // o: q); the MLP's pairs make theirs per chunk.
    let dropout = if w.dropout {
        rows * (3 * h + q) * act
    } else {
        0
    };
    // A kept block also keeps its MLP's gate and up (and, with dropout, their masked inputs).
    let kept_mlp = kept_mlp_bytes_per_block(cfg, w.lora_rank, rows as usize) as u64 / 4 * act
        + if w.dropout { rows * 2 * h * act } else { 0 };
    let kept = keep * (per_block + dropout + kept_mlp);
    // The attention mask (per row of the batch when packed) and the RoPE tables.
    let batch_tensors = if w.packed { rows * t } else { t * t } * act + 2 * rows * 64 * act;

    // A block's backward: its activations (recomputed unless kept), the incoming and outgoing
    // gradients, and the larger of the MLP's temporaries and attention's. The MLP goes through
    // the rows in chunks (`mlp_chunk_rows`): a chunk's recomputed gate, up and activation and
    // their gradients (five `[chunk, intermediate]` with the fused kernels; candle's composite
    // SwiGLU backward makes about eight), and the `[rows, hidden]` gradient it assembles.
    // Attention: candle's composite ops go through the queries in chunks (grouped copies of
    // q, out and their gradients, k/v and their gradients, four f32 [B, heads, chunk, T]
    // temporaries); the fused kernels hold dq, per-query-head dk and dv, the summed dk, dv and
    // the incoming gradient, with no [heads, T, T] temporary.
    let c = mlp_chunk_rows(rows as usize, i as usize, act as usize) as u64;
    let chunk_dropout = if w.dropout { c * (2 * h + i) * act } else { 0 };
    let (mlp_temps, attn_temps) = if kernels {
        (
            c * (5 * i + 2 * h) * act + chunk_dropout + rows * h * act,
            rows * (2 * h + 4 * q + 2 * kv) * act,
        )
    } else {
        let heads = crate::kernels::Heads {
            b: w.batch_size,
            t: w.seq_len,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            d: cfg.head_dim,
        };
        let chunk = (w.batch_size * heads.nh * composite_chunk_rows(heads) * w.seq_len * 4) as u64;
        // Off the CPU, dropout masks are hashed on the device in chunks of entries, which are
        // then joined: the hashing's temporaries and a second copy of the largest mask.
        let hashing = if w.dropout {
            crate::model::ops::dropout::DEVICE_MASK_WORK + rows * i * act
        } else {
            0
        };
        (
            c * (8 * i + 2 * h) * act + chunk_dropout + hashing + rows * h * act,
            rows * (2 * h + 5 * q + 6 * kv) * act + 4 * chunk,
        )
    };
    // A quantized linear is dequantized for each product, one row slice of `SLICE_BYTES`
    // (f32) at a time, converted to the activations' dtype; the fused CPU kernels take the
    // whole weight in f32, one linear at a time, and so widen a half-precision one.
    let slice = SLICE_BYTES as u64;
    let largest_linear = Target::ALL
        .iter()
        .map(|t| {
            let (a, b) = t.dims(cfg);
            (a * b) as u64
        })
        .max()
        .unwrap_or(0);
    let widened = kernels && w.weights.dense_bytes() < 4.0;
    let dequantized = match w.weights {
        WeightFormat::Dense(_) if widened => largest_linear * 4,
        WeightFormat::Dense(_) => 0,
        WeightFormat::Quantized { .. } if kernels => largest_linear * 4 + slice,
        WeightFormat::Quantized { .. } => slice + slice / 4 * act,
    };
    let block = per_block + dropout + input + mlp_temps.max(attn_temps) + dequantized;
    // Its peak is at the top block (every input still held, one block's gradients) or at the
    // bottom one (one input left, every gradient resident), whichever is larger.
    let top = inputs + kept + grads_per_block;
    let bottom =
        input + (keep.min(1)) * (per_block + dropout + kept_mlp) + grads_per_block * adapted;
    let backward = block + top.max(bottom);
    // The head: the final hidden state, its gradient, the scored rows, and two [chunk, vocab]
    // f32 temporaries (candle's ops; the fused CPU kernel holds one); every block input held.
    let chunk = HEAD_CHUNK.min(rows as usize) as u64;
    let chunks = if kernels { 1 } else { 2 };
    // A half-precision head is widened to f32 a slice of vocabulary rows at a time.
    let head_slice = match w.weights {
        WeightFormat::Dense(_) if widened => {
            crate::model::vocab::SLICE_ROWS.min(cfg.vocab_size) as u64 * h * 4
        }
        _ => 0,
    };
    let head = 3 * rows * h * act
        + chunks * chunk * cfg.vocab_size as u64 * 4
        + head_slice
        + inputs
        + kept;
    // The update: every gradient resident.
    let update = 4 * params;
    let (work_name, work) = largest([
        ("block backward", backward),
        ("LM head and loss", head),
        ("optimizer update", update),
    ]);
    let dynamic = lora_state + batch_tensors + work;
    let slack = (dynamic as f64 * SLACK) as u64;

    let terms = four_terms(
        format!("frozen weights ({})", w.weights.describe()),
        weights,
        params,
        lora_state,
        format!(
            "{work_name} + {} saved block inputs{}",
            adapted - keep,
            if keep > 0 {
                format!(" + {keep} kept")
            } else {
                String::new()
            }
        ),
        work + batch_tensors,
        ("runtime, tokenizer, allocator slack", runtime + slack),
    );
    let train_peak = terms.iter().map(|t| t.bytes).sum();
    // While loading: the weights converted so far and the piece in flight (files are read,
    // not mapped, so none of their pages count).
    let load_peak = runtime + weights + w.load_work;
    Estimate {
        terms,
        train_peak,
        load_peak,
        cache: 0,
    }
}
