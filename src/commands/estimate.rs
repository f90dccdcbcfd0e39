//! `your_ai estimate`: the pre-flight memory estimate of a training run, from the model's
//! config alone, so a run can be sized before its weights are downloaded.

use crate::cli::EstimateArgs;
use crate::error::{Error, Result};
use crate::runtime::device::DTypeChoice;
use crate::runtime::memory::budget::GB;
use crate::train::estimate::{estimate, suggestions, WeightFormat, Workload};

pub fn run(a: EstimateArgs) -> Result<()> {
    let targets = super::train::parse_targets(&a.lora_targets)?;
    for (v, flag) in [
        (a.batch_size, "--batch-size"),
        (a.max_seq_length, "--max-seq-length"),
        (a.lora_rank, "--lora-rank"),
    ] {
        if v == 0 {
            return Err(Error::Usage(format!("{flag} 0: it must be at least 1")));
        }
    }
    let (cfg, _) = crate::runtime::presets::shape(&a.model)?;
    let cfg = &cfg;
    let layers = cfg.num_hidden_layers;
    let adapted = a.num_layers.unwrap_or(layers);
    if adapted == 0 || adapted > layers {
        return Err(Error::Usage(format!(
            "--num-layers {adapted}: the model has {layers} blocks; give 1 to {layers}"
        )));
    }
    let bytes = match a.dtype {
        DTypeChoice::F32 | DTypeChoice::Auto => 4,
        DTypeChoice::F16 | DTypeChoice::Bf16 => 2,
    };
    let weights = match a.quantize {
        None | Some(4) | Some(8) => {
            WeightFormat::for_quantize(super::quant_flag(a.quantize)?, bytes)
        }
        Some(q) => {
            return Err(Error::Usage(format!(
                "--quantize {q}: give 4 or 8 (bits per weight)"
            )))
        }
    };
    let w = Workload {
        batch_size: a.batch_size,
        seq_len: a.max_seq_length,
        lora_rank: a.lora_rank,
        targets,
        adapted_layers: adapted,
        keep_blocks: 0,
        dropout: false,
        packed: false,
        act_bytes: bytes,
        weights,
        // Only the peak of training is asked for: a quantized base is loaded tensor by tensor.
        source_bytes: 0,
        // f32 is the CPU's dtype, where the fused kernels run.
        cpu_kernels: bytes == 4 && crate::kernels::enabled(),
    };
    let budget = match a.max_memory {
        Some(gb) if gb.is_finite() && gb > 0.0 => Some((gb * GB) as u64),
        Some(gb) => {
            return Err(Error::Usage(format!(
                "--max-memory {gb}: give the budget in GB as a positive number"
            )))
        }
        None => None,
    };
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
        "workload: batch {} × length {}, LoRA rank {} on {} of the last {adapted} blocks, {}",
        a.batch_size,
        a.max_seq_length,
        a.lora_rank,
        w.targets
            .iter()
            .map(|t| t.module())
            .collect::<Vec<_>>()
            .join(","),
        weights.describe()
    );
    let e = estimate(cfg, &w);
    print!("{}", e.table(budget));
    println!(
        "estimated peak: {:.2} GB ({:.2} GiB)",
        e.train_peak as f64 / GB,
        e.train_peak as f64 / (1u64 << 30) as f64
    );
    if let Some(b) = budget.filter(|&b| e.train_peak > b) {
        let advice = suggestions(cfg, &w, b, true);
        println!(
            "over the budget by {:.2} GB; fits with: {}",
            (e.train_peak - b) as f64 / GB,
            if advice.is_empty() {
                "nothing smaller".into()
            } else {
                advice.join(", ")
            }
        );
    }
    Ok(())
}
