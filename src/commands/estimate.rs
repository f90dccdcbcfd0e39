//! `your_ai estimate`: the pre-flight memory estimate of a training run, from the model's
//! config alone, so a run can be sized before its weights are downloaded.

use crate::cli::EstimateArgs;
use crate::data::args::DEFAULT_MAX_SEQ_LENGTH;
use crate::engine::choice::EngineChoice;
use crate::error::{Error, Result};
use crate::runtime::device::{compute_dtype, cpu_auto_weights, DTypeChoice, DeviceChoice};
use crate::runtime::memory::budget;
use crate::runtime::memory::budget::GB;
use crate::train::estimate::{estimate, suggestions, Workload};
use crate::train::plan::{keep_blocks, weights_and_step};
use candle_core::{DType, Device};

pub fn run(a: EstimateArgs) -> Result<()> {
    let (batch, lora) = (&a.batch, &a.lora);
    let targets = lora.targets();
    batch.check()?;
    lora.check()?;
    let inspected = crate::runtime::presets::shape(&a.model)?;
    let cfg = &inspected.cfg;
    // As `train` takes it (no record here of what was given: the default value stands for it).
    let mut batch = batch.clone();
    let given = batch.max_seq_length != DEFAULT_MAX_SEQ_LENGTH;
    batch.fit_context(cfg.max_position_embeddings, given)?;
    let batch = &batch;
    let layers = cfg.num_hidden_layers;
    let adapted = lora.num_layers.unwrap_or(layers);
    if adapted == 0 || adapted > layers {
        return Err(Error::Usage(format!(
            "--num-layers {adapted}: the model has {layers} blocks; give 1 to {layers}"
        )));
    }
    let engine = a.engine.unwrap_or(EngineChoice::Candle);
    // The device modelled: as given, else a GPU for bf16/f16 given and the CPU otherwise.
    let cpu = match a.device {
        Some(DeviceChoice::Cpu) => true,
        Some(DeviceChoice::Cuda | DeviceChoice::Metal) => false,
        Some(DeviceChoice::Auto) | None => !matches!(a.dtype, DTypeChoice::F16 | DTypeChoice::Bf16),
    };
    // The weights' dtype as `train` picks it.
    let dtype = match a.dtype {
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::F16 => DType::F16,
        DTypeChoice::Bf16 => DType::BF16,
        DTypeChoice::Auto if !cpu => DType::BF16,
        DTypeChoice::Auto => match engine {
            EngineChoice::Candle => {
                cpu_auto_weights(inspected.matrix_dtype, a.quantize.quantize.is_some())
            }
            EngineChoice::Mlx => DType::F32,
        },
    };
    let bytes = dtype.size_in_bytes();
    // As `train` computes: the candle engine on the CPU in f32 whatever the weights' dtype, MLX
    // in theirs.
    let act_bytes = match engine {
        EngineChoice::Candle if cpu => compute_dtype(dtype, &Device::Cpu).size_in_bytes(),
        _ => bytes,
    };
    let (weights, step) = weights_and_step(
        &inspected,
        engine,
        a.quantize.quantize,
        (act_bytes, bytes),
        cpu,
    );
    let mut w = Workload {
        batch_size: batch.batch_size,
        seq_len: batch.max_seq_length,
        lora_rank: lora.lora_rank,
        targets,
        adapted_layers: adapted,
        keep_blocks: 0,
        dropout: lora.lora_dropout > 0.0,
        packed: a.pack,
        act_bytes,
        weights,
        // As `train` computes it, so the two agree on the same model and flags.
        load_work: inspected.load_work_bytes(a.quantize.quantize, bytes),
        step,
    };
    // `train`'s default budget on this machine, unless one is given (which may be another
    // machine's: it is not checked against this one's memory).
    let budget = match a.budget.max_memory {
        Some(gb) => (gb * GB) as u64,
        None => {
            budget::resolve(None, budget::device_memory(&candle_core::Device::Cpu).total)
                .map_err(Error::Usage)?
                .bytes
        }
    };
    w.keep_blocks = keep_blocks(cfg, &w, a.keep_activations, budget);
    println!(
        "{}: {} blocks, hidden {}, intermediate {}, {} heads ({} key/value), vocabulary {}",
        a.model,
        layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size
    );
    println!(
        "workload: batch {} × length {}{}, LoRA rank {} on {} of the last {adapted} blocks, {}",
        batch.batch_size,
        batch.max_seq_length,
        if a.pack { " (packed)" } else { "" },
        lora.lora_rank,
        w.targets
            .iter()
            .map(|t| t.module())
            .collect::<Vec<_>>()
            .join(","),
        weights.describe()
    );
    let e = estimate(cfg, &w);
    print!("{}", e.table(Some(budget)));
    // The larger of loading and training, as `train`'s pre-flight judges it.
    let peak = e.peak();
    println!(
        "estimated peak: {:.2} GB ({:.2} GiB)",
        peak as f64 / GB,
        peak as f64 / (1u64 << 30) as f64
    );
    if peak > budget {
        let advice = suggestions(cfg, &w, budget, true);
        println!(
            "over the budget by {:.2} GB; fits with: {}",
            (peak - budget) as f64 / GB,
            if advice.is_empty() {
                "nothing smaller".into()
            } else {
                advice.join(", ")
            }
        );
    }
    Ok(())
}
