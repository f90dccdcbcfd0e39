//! The pre-flight: before any weight is read, the memory budget is set, the run's peak is
//! estimated, and a run that would not fit is refused with advice that works (or, with
//! `--auto-fit`, its batch shrunk); `--keep-activations auto` is resolved against the budget.

use super::estimate::{
    estimate, largest_batch, suggestions, Estimate, StepKind, WeightFormat, Workload,
};
use super::settings::KeepActivations;
use super::settings::{LoraArgs, MemoryArgs};
use crate::data::args::BatchArgs;
use crate::engine::choice::EngineChoice;
use crate::error::{Error, Result};
use crate::model::quantized::QuantBits;
use crate::model::{Inspected, LoadOptions};
use crate::runtime::memory::budget::{self, Budget};

/// What the pre-flight decided: the budget, and the settings that fit it.
pub struct Plan {
    pub budget: Budget,
    /// `--batch-size`, or the largest that fits with `--auto-fit`.
    pub batch_size: usize,
    /// Adapted blocks that keep their activations (`--keep-activations` resolved).
    pub keep_blocks: usize,
    pub estimate: Estimate,
    /// The dtype the frozen weights are held in.
    pub weights_dtype: candle_core::DType,
}

/// Sets the budget, prints the memory estimate and refuses (or, with `--auto-fit`, shrinks the
/// batch of) a run that would not fit — before any weight is read.
pub fn preflight(
    inspected: &Inspected,
    load: &LoadOptions,
    batch: &BatchArgs,
    lora: &LoraArgs,
    memory: &MemoryArgs,
    packed: bool,
    engine: EngineChoice,
) -> Result<Plan> {
    let (device, dtype) = (&load.device, load.dtype);
    let mem = device_memory_for(engine, device);
    let budget = budget::resolve(memory.budget.max_memory, mem.total).map_err(Error::Usage)?;
    for line in budget.describe() {
        eprintln!("{line}");
    }
    let cfg = &inspected.cfg;
    let adapted = lora.num_layers.unwrap_or(cfg.num_hidden_layers);
    let act_bytes = dtype.size_in_bytes();
    let weight_bytes = load.weight_dtype.size_in_bytes();
    let (weights, step) = weights_and_step(
        inspected,
        engine,
        load.quantize,
        (act_bytes, weight_bytes),
        computes_on_cpu(engine, device),
    );
    let mut w = Workload {
        batch_size: batch.batch_size,
        seq_len: batch.max_seq_length,
        lora_rank: lora.lora_rank,
        targets: lora.targets(),
        adapted_layers: adapted.min(cfg.num_hidden_layers),
        keep_blocks: 0,
        dropout: lora.lora_dropout > 0.0,
        packed,
        act_bytes,
        weights,
        load_work: inspected.load_work_bytes(load.quantize, weight_bytes),
        step,
    };
    // What is kept whatever the budget (`all`, a number) counts in the fit below; `auto`
    // keeps only what the budget has room for once the batch is set.
    if memory.keep_activations != KeepActivations::Auto {
        w.keep_blocks = keep_blocks(cfg, &w, memory.keep_activations, budget.bytes);
    }
    let fits = |w: &Workload| estimate(cfg, w).peak() <= budget.bytes;
    if !fits(&w) {
        let e = estimate(cfg, &w);
        let over = e.peak() - budget.bytes;
        // A tenth of the budget spare where a batch allows it (as `--keep-activations auto`
        // leaves), else batch 1, the most spare there is: the estimate is not exact, and a run
        // at 99% of its budget stops at the first step that allocates a little more.
        let room = budget.bytes / 10 * 9;
        let fitted = largest_batch(cfg, &w, batch.batch_size, room)
            .or_else(|| largest_batch(cfg, &w, 1, budget.bytes));
        match (memory.auto_fit, fitted) {
            (true, Some(b)) => {
                eprintln!(
                    "--auto-fit: batch size {} would need {:.2} GB; training with batch size {b}, which fits",
                    batch.batch_size,
                    e.peak() as f64 / 1e9
                );
                w.batch_size = b;
            }
            _ => {
                eprint!("{}", e.table(Some(budget.bytes)));
                let advice = suggestions(cfg, &w, budget.bytes, true);
                let advice = if advice.is_empty() {
                    "nothing smaller fits either; this model needs a machine with more memory"
                        .into()
                } else {
                    format!("any one of these fits: {}", advice.join(", "))
                };
                return Err(Error::Usage(format!(
                    "--max-memory: the estimated peak, {:.2} GB, is {:.2} GB over the {:.2} GB budget; {advice}{}",
                    e.peak() as f64 / 1e9,
                    over as f64 / 1e9,
                    budget.bytes as f64 / 1e9,
                    if memory.auto_fit || batch.batch_size == 1 {
                        ""
                    } else {
                        " (or pass --auto-fit to pick the batch size)"
                    }
                )));
            }
        }
    }
    let keep_blocks = keep_blocks(cfg, &w, memory.keep_activations, budget.bytes);
    if let KeepActivations::Blocks(n) = memory.keep_activations {
        if n > keep_blocks {
            eprintln!(
                "note: --keep-activations {n}: the run adapts {keep_blocks} blocks, so it keeps \
                 {keep_blocks} blocks' activations"
            );
        }
    }
    w.keep_blocks = keep_blocks;
    let e = estimate(cfg, &w);
    eprint!("{}", e.table(Some(budget.bytes)));
    if e.peak() > budget.bytes {
        return Err(Error::Usage(format!(
            "--keep-activations: keeping {keep_blocks} blocks' activations needs {:.2} GB, over the {:.2} GB budget; use --keep-activations auto or none",
            e.peak() as f64 / 1e9,
            budget.bytes as f64 / 1e9
        )));
    }
    Ok(Plan {
        budget,
        batch_size: w.batch_size,
        keep_blocks,
        estimate: e,
        weights_dtype: load.weight_dtype,
    })
}

/// Adapted blocks of `w` that keep their activations under `keep` and `budget`: `auto` keeps as
/// many as leave a tenth of the budget spare. `estimate` resolves it the same way, so the two
/// print the same figures for the same model and flags.
pub fn keep_blocks(
    cfg: &crate::model::ModelConfig,
    w: &Workload,
    keep: KeepActivations,
    budget: u64,
) -> usize {
    let room = budget / 10 * 9;
    let keep_fits = |k: usize| {
        estimate(
            cfg,
            &Workload {
                keep_blocks: k,
                ..w.clone()
            },
        )
        .peak()
            <= room
    };
    match keep {
        KeepActivations::None => 0,
        KeepActivations::All => w.adapted_layers,
        KeepActivations::Blocks(n) => n.min(w.adapted_layers),
        KeepActivations::Auto => (0..=w.adapted_layers)
            .rev()
            .find(|&k| keep_fits(k))
            .unwrap_or(0),
    }
}

/// The memory a run on `engine` plans its budget against: `device`'s, or under MLX what MLX
/// says of its device (on a Mac, bounded by Metal's recommended working set).
pub fn device_memory_for(
    engine: EngineChoice,
    device: &candle_core::Device,
) -> budget::DeviceMemory {
    match engine {
        #[cfg(feature = "mlx")]
        EngineChoice::Mlx => crate::runtime::memory::mlx::device_memory(),
        _ => budget::device_memory(device),
    }
}

/// Whether `engine` computes on the CPU: `device`'s, or under MLX the device MLX was put on
/// ([`crate::engine::choice::mlx_load_options`]; its models load on the host either way).
pub fn computes_on_cpu(engine: EngineChoice, device: &candle_core::Device) -> bool {
    match engine {
        EngineChoice::Mlx => !crate::engine::choice::mlx_on_gpu(),
        EngineChoice::Candle => device.is_cpu(),
    }
}

/// How `engine` will hold the frozen weights of `inspected` with `quantize` (activations of
/// `act_bytes`, dense weights of `weight_bytes`, on the CPU or not), and which step's memory
/// to model.
pub fn weights_and_step(
    inspected: &Inspected,
    engine: EngineChoice,
    quantize: Option<QuantBits>,
    (act_bytes, weight_bytes): (usize, usize),
    cpu: bool,
) -> (WeightFormat, StepKind) {
    let host = weight_format(inspected, quantize, weight_bytes);
    match engine {
        EngineChoice::Candle => (host, StepKind::candle(cpu, act_bytes)),
        EngineChoice::Mlx => (
            super::estimate::mlx::weight_format(
                quantize.map(|q| mlx_bits(inspected, q)),
                act_bytes,
            ),
            StepKind::Mlx { host, gpu: !cpu },
        ),
    }
}

/// The width the MLX engine holds a model's block linears at under `--quantize q`: a GGUF's
/// own, where all its linears are in one format MLX maps block for block.
fn mlx_bits(inspected: &Inspected, q: QuantBits) -> QuantBits {
    let crate::model::source::ModelSource::Gguf(p) = &inspected.source else {
        return q;
    };
    let formats = crate::weights::GgufFile::open(p).map(|g| g.linear_formats());
    let own: Vec<Option<QuantBits>> = formats
        .unwrap_or_default()
        .into_iter()
        .map(super::estimate::mlx::own_bits)
        .collect();
    match own.first() {
        Some(Some(b)) if own.iter().all(|o| o == &Some(*b)) => *b,
        _ => q,
    }
}

/// How the frozen weights of `inspected` will sit in memory with `quantize`: a GGUF keeps the
/// block linears it stores quantized in their own format (Q4_K, Q6_K, …), so those are sized
/// from the file rather than as the format `--quantize` names.
pub fn weight_format(
    inspected: &crate::model::Inspected,
    quantize: Option<QuantBits>,
    dtype_bytes: usize,
) -> crate::train::estimate::WeightFormat {
    let format = WeightFormat::for_quantize(quantize, dtype_bytes);
    match (format, &inspected.source) {
        (
            WeightFormat::Quantized {
                linear,
                embed,
                head,
                other,
            },
            crate::model::source::ModelSource::Gguf(p),
        ) => match crate::weights::GgufFile::open(p) {
            Ok(g) => {
                let embed = g
                    .bytes_per_weight("token_embd.weight", embed)
                    .unwrap_or(embed);
                WeightFormat::Quantized {
                    linear: g.quantized_linear_bytes(linear).unwrap_or(linear),
                    // A tied matrix (no output tensor) is sized by the head's entry.
                    head: g.bytes_per_weight("output.weight", head).unwrap_or(
                        if inspected.cfg.tie_word_embeddings {
                            g.bytes_per_weight("token_embd.weight", head)
                                .unwrap_or(head)
                        } else {
                            head
                        },
                    ),
                    embed,
                    other,
                }
            }
            Err(_) => format,
        },
        _ => format,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::estimate::tests::{smollm2, workload};

    /// Both engines keep what is asked, and `auto` fits what the budget leaves: the MLX
    /// engine's kept block holds its frozen products, so fewer fit in the same budget.
    #[test]
    fn both_engines_keep_what_the_budget_allows() {
        let cfg = smollm2();
        let mut w = workload();
        let big = 1 << 40;
        for step in [
            w.step,
            StepKind::Mlx {
                host: WeightFormat::Dense(4.0),
                gpu: false,
            },
        ] {
            w.step = step;
            assert_eq!(keep_blocks(&cfg, &w, KeepActivations::All, big), 30);
            assert_eq!(keep_blocks(&cfg, &w, KeepActivations::Auto, big), 30);
            assert_eq!(keep_blocks(&cfg, &w, KeepActivations::Blocks(4), big), 4);
            assert_eq!(keep_blocks(&cfg, &w, KeepActivations::None, big), 0);
            let none = estimate(
                &cfg,
                &Workload {
                    keep_blocks: 0,
                    ..w.clone()
                },
            )
            .peak();
            let all = estimate(
                &cfg,
                &Workload {
                    keep_blocks: 30,
                    ..w.clone()
                },
            )
            .peak();
            // A budget between the two keeps some but not all.
            let mid = (none + all) / 2 * 10 / 9;
            let k = keep_blocks(&cfg, &w, KeepActivations::Auto, mid);
            assert!(0 < k && k < 30, "{step:?}: {k}");
        }
    }
}
