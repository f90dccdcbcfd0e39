//! The pre-flight estimate for the MLX engine (`engine/mlx`): the process's peak resident
//! memory, term by term, as that step holds it. It differs from the candle engine's:
//!
//! - the frozen weights are MLX arrays: embeddings and head dense in the compute dtype, the
//!   block linears with `--quantize` in MLX's affine format (groups of 32, a scale and a bias
//!   in the compute dtype each);
//! - MLX's autograd differentiates a block (its `[heads, T, T]` attention temporaries on the
//!   CPU backend's composite attention), and a head chunk's gradient is written out;
//! - a block that keeps its activations keeps its frozen linears' products (`engine/mlx/kept`);
//! - every LoRA gradient of the step stays alive until the step's one evaluation ends;
//! - MLX's allocator keeps freed buffers in its cache during a step for reuse (cleared after
//!   it). The engine limits the cache to [`Estimate::cache`], the step's working set (at most
//!   a sixteenth of the budget, and 2 GB), so a step holds at most its working set twice;
//! - the load is the host load followed by the conversion, whose largest moment is the
//!   vocabulary's: the host's matrix beside MLX's parts, or the parts beside the joined whole;
//! - on a GPU the measure is MLX's memory, in the device: the process's host memory (its
//!   libraries, the host load) is not in it. The first GPU memory check on an H200 compared
//!   the process's resident memory (1.1 GB of CUDA libraries for a two-block model whatever the
//!   work) with an estimate of the device's arrays.
//!
//! Calibrated on SmolLM2 with MLX's CPU backend against `your_ai benchmark --engine mlx`
//! (docs/mlx.md has the table); the constants say which measurement set them.

use super::{
    four_terms, frozen_bytes, largest, lora_params, runtime_bytes, vocab_matrix_bytes, Estimate,
    WeightFormat,
};
use super::{Workload, SLACK};
use crate::data::batch::bucket;
use crate::model::lora::Target;
use crate::model::quantized::QuantBits;
use crate::model::vocab::SLICE_ROWS;
use crate::model::ModelConfig;

/// MLX's and its BLAS's libraries, resident beside the rest of the runtime (measured: resident
/// memory less MLX's active memory, with an empty cache).
const MLX_RUNTIME_BYTES: u64 = 40_000_000;
/// Scored rows per LM-head chunk (`engine/mlx/head.rs`).
const HEAD_CHUNK: u64 = 256;
/// `[chunk, vocab]` f32 arrays alive in one head chunk (logits, the shifted logits or their
/// exponent, the scaled softmax), and those of the next chunk. MLX allocates an op's output
/// when it dispatches the op and frees its inputs when the op has run, and it dispatches ahead
/// of the running work, so the next chunk's arrays exist before the previous chunk's are
/// freed. Measured: 2.3 copies with one chunk, 4.3 with two or more. An evaluation per chunk
/// brings that down to 2.6, at the price of a host sync per chunk.
const HEAD_COPIES: f64 = 2.5;
const NEXT_CHUNK_COPIES: f64 = 2.0;
/// `[B, heads, T, T]` f32 arrays alive in a block's attention backward (MLX's composite
/// attention on the CPU: scores, mask, probabilities and their gradients; measured at T = 1024).
const ATTENTION_COPIES: u64 = 7;
/// What a queued block holds, in a block's per-row working sets. Measured on an H200 (MLX's
/// CUDA backend, eight 8B-shaped blocks, each keeping its products): the pipelined step peaked
/// 2.19 GB above the block-by-block one at 2048 tokens and 0.51 GB at 512, about 3.8 and 3.6
/// such working sets; on MLX's CPU backend (SmolLM2, 1×512, 30 blocks) 0.10 GB, about 3.4.
const IN_FLIGHT_ROWS: u64 = 4;
/// The largest cache allowance (as `runtime::memory::mlx::cache_limit_for` caps it).
const CACHE_CAP: u64 = 2_000_000_000;

/// The zeros off the diagonal of the step's block-diagonal Bs: a group of linears that read
/// one input (`Target::BY_INPUT`) with k of the run's targets has a B of all the group's
/// outputs by k·r.
fn diagonal_zeros(cfg: &ModelConfig, w: &Workload) -> u64 {
    let per_block: usize = Target::BY_INPUT
        .iter()
        .map(|g| {
            let ts: Vec<&Target> = Target::ALL[g.clone()]
                .iter()
                .filter(|t| w.targets.contains(t))
                .collect();
            let all: usize = Target::ALL[g.clone()].iter().map(|t| t.dims(cfg).1).sum();
            let own: usize = ts.iter().map(|t| t.dims(cfg).1).sum();
            (all * ts.len() - own) * w.lora_rank
        })
        .sum();
    (per_block * w.adapted_layers) as u64
}

/// How MLX holds the frozen weights: dense at `dtype_bytes`, or with `--quantize` the block
/// linears at `bits` in groups of 32 with a scale and a bias at `dtype_bytes` each.
/// The width a GGML block format is mapped onto MLX at, block for block (engine/mlx/blocks.rs):
/// a quantized GGUF keeps its own values whatever `--quantize` says, as on the candle engine.
pub fn own_bits(dt: candle_core::quantized::GgmlDType) -> Option<QuantBits> {
    use candle_core::quantized::GgmlDType as G;
    match dt {
        G::Q4_0 | G::Q4_1 => Some(QuantBits::Four),
        G::Q8_0 => Some(QuantBits::Eight),
        _ => None,
    }
}

pub fn weight_format(quantize: Option<QuantBits>, dtype_bytes: usize) -> WeightFormat {
    let db = dtype_bytes as f64;
    match quantize {
        None => WeightFormat::Dense(db),
        Some(q) => WeightFormat::Quantized {
            linear: q.bits() as f64 / 8.0 + 2.0 * db / 32.0,
            embed: db,
            head: db,
            other: db,
        },
    }
}

/// Bytes of the embedding and head matrices (one when tied) in `format`.
fn vocab_bytes(cfg: &ModelConfig, format: WeightFormat) -> u64 {
    let (embed, head) = match format {
        WeightFormat::Dense(b) => (b, b),
        WeightFormat::Quantized { embed, head, .. } => (embed, head),
    };
    vocab_matrix_bytes(cfg, embed, head) as u64
}

pub fn estimate(cfg: &ModelConfig, w: &Workload, host: WeightFormat, gpu: bool) -> Estimate {
    let t = bucket(w.seq_len) as u64;
    let b = w.batch_size as u64;
    let rows = b * t;
    let db = w.act_bytes as u64;
    let (h, q, kv, i) = (
        cfg.hidden_size as u64,
        cfg.q_size() as u64,
        cfg.kv_size() as u64,
        cfg.intermediate_size as u64,
    );
    let vocab = cfg.vocab_size as u64;
    let adapted = w.adapted_layers.min(cfg.num_hidden_layers).max(1) as u64;
    // Host memory: outside MLX's measure on a GPU.
    let runtime = if gpu {
        0
    } else {
        runtime_bytes(cfg) + MLX_RUNTIME_BYTES
    };
    let weights = frozen_bytes(cfg, w.weights);
    let params = lora_params(cfg, w);
    // Parameters and AdamW's moments in f32, and the step's copy of the parameters in the
    // compute dtype, its Bs block-diagonal by input (engine/mlx/lowered.rs), whose gradients
    // come in that layout too.
    let lowered = params + diagonal_zeros(cfg, w);
    let lora_state = 12 * params + db * lowered;
    let grads = 4 * params + db * lowered;

    // Every adapted block's input, kept from the forward for its recompute, and in the blocks
    // that keep their activations the products of their frozen linears.
    let keep = (w.keep_blocks as u64).min(adapted);
    let outputs: u64 = Target::ALL.iter().map(|t| t.dims(cfg).1 as u64).sum();
    let products = keep * rows * outputs * db;
    let inputs = adapted * rows * h * db + products;
    // The head: one chunk's vocabulary-wide arrays, and the next's started early.
    let c = HEAD_CHUNK.min(rows);
    let next = (rows - c).min(c);
    let head = ((HEAD_COPIES * c as f64 + NEXT_CHUNK_COPIES * next as f64) * (vocab * 4) as f64)
        as u64
        + 4 * rows * h * 4;
    // A block's recompute and vector-Jacobian product: its activations and their gradients
    // (norms, q, k, v, attention, residual, gate, up, SwiGLU), the masked inputs with dropout,
    // the LoRA's low-rank products, and attention's `[B, heads, T, T]` temporaries.
    let per_row = 2 * (4 * h + 2 * q + 2 * kv + 3 * i) * db
        + if w.dropout { (5 * h + q + i) * db } else { 0 }
        + 2 * 7 * w.lora_rank as u64 * 4;
    let attention = ATTENTION_COPIES * b * cfg.num_attention_heads as u64 * t * t * 4;
    // The step queues a block while the one before it computes, and MLX allocates what the
    // queued block makes when it is queued: a second block's work is held meanwhile.
    let in_flight = IN_FLIGHT_ROWS * rows * per_row;
    let weight = |t: &Target| {
        let (a, b) = t.dims(cfg);
        (a * b) as u64
    };
    let block_params: u64 = Target::ALL.iter().map(weight).sum();
    // Quantized linears multiply as dense copies made for each product, except on Metal
    // (`engine/mlx/weights.rs`, `dequantizes`): a block's copies, at most, while it computes.
    let quantized = matches!(w.weights, WeightFormat::Quantized { .. });
    let dense_copies = if quantized && !(gpu && cfg!(target_os = "macos")) {
        block_params * db
    } else {
        0
    };
    let block = rows * per_row + attention + in_flight + dense_copies;
    // Its peak is at the head (every input held) or in the blocks' backward (inputs going,
    // gradients coming).
    let (work_name, work) = largest([
        ("LM head and loss", inputs + head),
        ("block backward", block + inputs.max(grads)),
    ]);
    // What the step freed, held in MLX's cache for reuse until the step ends: the engine sets
    // MLX's cache limit to this. Kept products are freed once, in the backward, and are not
    // the churn the cache is for (measured: SmolLM2, 1×1024, 30 blocks keeping theirs, MLX's
    // peak grew by the products' 0.64 GB and no more); the queued block's work is the next
    // block's, taken from the cache rather than added to it (counted twice, SmolLM2's 4×512
    // estimate was 49% over the measured peak on MLX's CPU backend).
    let cache = work.saturating_sub(products + in_flight).min(CACHE_CAP);
    // The update: the gradients and AdamW's new moments beside the old. (As much as when the
    // step joins its gradients into two f32 vectors: in half precision, the gradients, joined
    // in the compute dtype and cast.)
    let update = 8 * params;
    let (work_name, dynamic) = largest([(work_name, work + cache), ("optimizer update", update)]);
    // The per-row attention mask and RoPE tables of packed rows; a sliding window's mask.
    let batch_tensors = if w.packed {
        b * t * t * db + 2 * rows * (cfg.head_dim as u64 / 2) * 4
    } else if cfg.sliding_window.is_some() {
        t * t * db
    } else {
        0
    };
    let slack = ((lora_state + dynamic + batch_tensors) as f64 * SLACK) as u64;

    let terms = four_terms(
        format!("frozen weights ({}; MLX)", w.weights.describe()),
        weights,
        params,
        lora_state,
        format!(
            "{work_name} + {adapted} saved block inputs{} + MLX's cache",
            if keep > 0 {
                format!(" ({keep} with their products)")
            } else {
                String::new()
            }
        ),
        dynamic + batch_tensors,
        ("runtime, MLX, tokenizer, allocator slack", runtime + slack),
    );
    let train_peak = terms.iter().map(|t| t.bytes).sum();

    // The load: first on the host as the candle engine's, then converted block by block (a
    // block's dense f32 copies alive until it is evaluated), the vocabulary last, in parts of
    // `SLICE_ROWS` rows (each with an f32 copy on the host and in MLX): the host's matrix
    // beside MLX's parts, then (the host's dropped) the parts beside the joined whole.
    let host_load = runtime + frozen_bytes(cfg, host) + w.load_work;
    let mlx_vocab = vocab_bytes(cfg, w.weights);
    let part = 2 * SLICE_ROWS.min(cfg.vocab_size) as u64 * h * 4;
    let host_vocab = if gpu { 0 } else { vocab_bytes(cfg, host) };
    let vocab_phase = (host_vocab + mlx_vocab + part).max(2 * mlx_vocab);
    // A joined linear (q, k and v; gate and up) is made beside its parts.
    let joined: u64 = Target::BY_INPUT
        .iter()
        .filter(|g| g.len() > 1)
        .flat_map(|g| &Target::ALL[g.clone()])
        .map(weight)
        .sum();
    let conversion = runtime
        + weights.saturating_sub(mlx_vocab)
        + (block_params * (4 + db) + joined * db).max(vocab_phase);
    Estimate {
        terms,
        train_peak,
        load_peak: if gpu {
            conversion
        } else {
            host_load.max(conversion)
        },
        cache,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{smollm2, workload as base};
    use super::super::StepKind;
    use super::*;

    fn workload(batch: usize, len: usize, quantize: Option<QuantBits>) -> Workload {
        Workload {
            batch_size: batch,
            seq_len: len,
            weights: weight_format(quantize, 4),
            step: StepKind::Mlx {
                host: WeightFormat::Dense(4.0),
                gpu: false,
            },
            ..base()
        }
    }

    #[test]
    fn mlx_weights_are_sized_as_mlx_holds_them() {
        let cfg = smollm2();
        // f32: every weight at 4 bytes.
        assert_eq!(frozen_bytes(&cfg, weight_format(None, 4)), 134_515_008 * 4);
        // 4-bit: half a byte plus an f32 scale and bias per 32 weights on the linears; the
        // tied vocabulary matrix and the norms dense.
        let (linear, other) = super::super::frozen_params(&cfg);
        let q4 = frozen_bytes(&cfg, weight_format(Some(QuantBits::Four), 4));
        assert_eq!(q4, (linear as f64 * 0.75) as u64 + other * 4);
    }

    #[test]
    fn the_mlx_estimate_grows_with_the_work_and_the_chunks() {
        let cfg = smollm2();
        let at = |b, t| estimate(&cfg, &workload(b, t, None), WeightFormat::Dense(4.0), false);
        let small = at(1, 128);
        assert_eq!(
            small.terms.iter().map(|t| t.bytes).sum::<u64>(),
            small.train_peak
        );
        assert!(at(2, 256).train_peak > small.train_peak);
        assert!(at(1, 1024).train_peak > at(2, 256).train_peak);
        // Lengths are bucketed as the engine lays rows out: 100 and 128 are one shape.
        assert_eq!(at(1, 100).train_peak, small.train_peak);
        let q4 = estimate(
            &cfg,
            &workload(1, 128, Some(QuantBits::Four)),
            WeightFormat::Dense(4.0),
            false,
        );
        assert!(q4.train_peak < small.train_peak);
    }

    /// On a GPU the estimate is of MLX's memory in the device: the process's libraries and the
    /// host's load are left out, and everything MLX holds is still counted.
    #[test]
    fn on_a_gpu_the_host_is_left_out() {
        let cfg = smollm2();
        let w = workload(1, 512, None);
        let host = WeightFormat::Dense(4.0);
        let (cpu, gpu) = (
            estimate(&cfg, &w, host, false),
            estimate(&cfg, &w, host, true),
        );
        let runtime = runtime_bytes(&cfg) + MLX_RUNTIME_BYTES;
        assert_eq!(gpu.terms[..3], cpu.terms[..3]);
        assert_eq!(gpu.train_peak + runtime, cpu.train_peak);
        // The whole converted model at least, less than with the host's memory.
        assert!(gpu.load_peak >= frozen_bytes(&cfg, w.weights));
        assert!(gpu.load_peak < cpu.load_peak);
    }

    /// The step's queued block holds its working set while the one before it computes: where
    /// the blocks' backward is the larger working set (here, 1×1024), the step's term holds
    /// the running block's activations and attention temporaries, four more per-row working
    /// sets for the queued block (once: not in MLX's cache), and the saved inputs.
    #[test]
    fn a_queued_block_is_held() {
        let cfg = smollm2();
        let w = workload(1, 1024, None);
        let e = estimate(&cfg, &w, WeightFormat::Dense(4.0), false);
        let term = &e.terms[2];
        assert!(term.name.starts_with("block backward"), "{}", term.name);
        let rows = 1024u64;
        let per_row = 2 * (4 * 576 + 2 * 576 + 2 * 192 + 3 * 1536) * 4 + 2 * 7 * 8 * 4;
        let attention = ATTENTION_COPIES * 9 * rows * rows * 4;
        let inputs = w.adapted_layers as u64 * rows * 576 * 4;
        let least = 2 * (rows * per_row + attention + inputs) + IN_FLIGHT_ROWS * rows * per_row;
        assert!(term.bytes >= least, "{} < {least}", term.bytes);
    }

    /// With `--quantize`, a block's linears multiply as dense copies in the compute dtype
    /// (except on Metal): its copies join its working set, and so MLX's cache allowance.
    #[test]
    fn quantized_blocks_hold_their_dense_copies() {
        let cfg = smollm2();
        let block_params = (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) as u64;
        for gpu in [false, true] {
            let term = |quantize| {
                let e = estimate(
                    &cfg,
                    &workload(1, 1024, quantize),
                    WeightFormat::Dense(4.0),
                    gpu,
                );
                assert!(e.terms[2].name.starts_with("block backward"));
                e.terms[2].bytes
            };
            let grown = term(Some(QuantBits::Four)) - term(None);
            let copies = if gpu && cfg!(target_os = "macos") {
                0
            } else {
                2 * block_params * 4
            };
            assert_eq!(grown, copies, "gpu {gpu}");
        }
    }

    /// A block that keeps its activations holds its frozen products (four joined ones),
    /// `[rows, 2h + q + 2kv + 2i]` in the compute dtype, from the forward to its backward.
    #[test]
    fn a_kept_block_adds_its_frozen_products() {
        let cfg = smollm2();
        let w = workload(2, 256, None);
        let with = |keep| {
            estimate(
                &cfg,
                &Workload {
                    keep_blocks: keep,
                    ..w.clone()
                },
                WeightFormat::Dense(4.0),
                false,
            )
            .train_peak
        };
        let per_block = 2 * 256 * (2 * 576 + 576 + 2 * 192 + 2 * 1536) as u64 * 4;
        // The products and their share of the allocator's slack; the cache does not grow.
        let grown = with(3) - with(0);
        assert!(grown >= 3 * per_block, "{grown} < {}", 3 * per_block);
        assert!(grown <= 3 * per_block * 12 / 10, "{grown}");
        assert_eq!(with(100), with(w.adapted_layers));
    }
}
