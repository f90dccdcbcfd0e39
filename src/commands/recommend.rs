//! `your_ai recommend`: the detected hardware and, for each model alias, whether LoRA and QLoRA
//! fit the memory budget, with the flags to use — from the memory estimate, before anything is
//! downloaded.

use crate::cli::RecommendArgs;
use crate::error::{Error, Result};
use crate::model::quantized::QuantBits;
use crate::model::ModelConfig;
use crate::runtime::device::cpu_auto_weights;
use crate::runtime::hardware::Hardware;
use crate::runtime::memory::budget::{auto_budget, GB};
use crate::runtime::presets::{self, MachinePreset};
use crate::runtime::setup_file;
use crate::train::estimate::{estimate, StepKind, WeightFormat, Workload};
use crate::train::plan::keep_blocks;
use crate::train::settings::KeepActivations;

/// The first configuration, shrinking from the preset's (batch, then length, then rank, then
/// adapted layers, each halved), whose estimate fits `budget`; with its peak.
pub fn fit(
    cfg: &ModelConfig,
    p: &MachinePreset,
    weights: WeightFormat,
    act_bytes: usize,
    budget: u64,
) -> std::result::Result<(Workload, u64), u64> {
    let layers = cfg.num_hidden_layers;
    let mut w = Workload {
        batch_size: p.batch_size,
        seq_len: p.max_seq_length,
        lora_rank: p.lora_rank,
        targets: crate::model::lora::Target::ALL.to_vec(),
        adapted_layers: p.num_layers.unwrap_or(layers).min(layers),
        keep_blocks: 0,
        dropout: false,
        packed: false,
        act_bytes,
        weights,
        // Only training's peak is fitted here (a streamed load peaks below it).
        load_work: 0,
        step: StepKind::candle(true, act_bytes),
    };
    loop {
        let peak = estimate(cfg, &w).train_peak;
        if peak <= budget {
            return Ok((w, peak));
        }
        if w.batch_size > 1 {
            w.batch_size /= 2;
        } else if w.seq_len > 256 {
            w.seq_len /= 2;
        } else if w.lora_rank > 4 {
            w.lora_rank /= 2;
        } else if w.adapted_layers > 1 {
            w.adapted_layers /= 2;
        } else {
            return Err(peak);
        }
    }
}

fn flags(w: &Workload, layers: usize, quantize: bool) -> String {
    let mut s = format!(
        "--batch-size {} --max-seq-length {} --lora-rank {}",
        w.batch_size, w.seq_len, w.lora_rank
    );
    if w.adapted_layers < layers {
        s.push_str(&format!(" --num-layers {}", w.adapted_layers));
    }
    if quantize {
        s.push_str(" --quantize 4");
    }
    s
}

pub fn run(a: RecommendArgs) -> Result<()> {
    let hw = Hardware::detect();
    println!("Hardware: {}", hw.describe());
    let gpu = !hw.gpus.is_empty();
    let total = match a.memory {
        // Checked as it was parsed (`parse_gb`).
        Some(gb) => (gb * GB) as u64,
        None => hw.compute_memory().ok_or_else(|| {
            Error::Usage(
                "the machine's memory could not be detected; give it with --memory GB".into(),
            )
        })?,
    };
    let budget = auto_budget(total);
    let p = presets::preset_for(total);
    // GPUs train in bf16; the CPU in f32.
    let act = if gpu { 2 } else { 4 };
    println!(
        "Memory: {:.1} GB {}; budget {:.1} GB; starting from the {} GB preset (presets/machines.yaml)",
        total as f64 / GB,
        if a.memory.is_some() { "(as given)" } else if gpu { "of GPU memory" } else { "of RAM" },
        budget as f64 / GB,
        p.memory_gb
    );
    let saved = setup_file::load()?;
    for (alias, repo) in crate::model::source::ALIASES {
        let Some(cfg) = presets::alias_shape(alias) else {
            continue;
        };
        let (linear, other) = crate::train::estimate::frozen_params(&cfg);
        println!(
            "\n{alias} ({repo}, {:.1}B parameters)",
            (linear + other) as f64 / 1e9
        );
        // On the CPU `train` keeps a bf16 checkpoint's weights in bf16 (computed in f32).
        let dense = if gpu {
            act
        } else {
            cpu_auto_weights(presets::alias_dtype(alias), false).size_in_bytes()
        };
        let modes = [
            ("LoRA ", WeightFormat::Dense(dense as f64), false),
            (
                "QLoRA",
                WeightFormat::quantized(QuantBits::Four, act as f64),
                true,
            ),
        ];
        for (name, weights, quantized) in modes {
            let preferred = quantized == p.quantize.is_some();
            match fit(&cfg, &p, weights, act, budget) {
                Ok((w, _)) => {
                    // `train` then keeps as many blocks' activations as the budget allows
                    // (`--keep-activations auto`): the peak it will estimate, and run at.
                    let keep = keep_blocks(&cfg, &w, KeepActivations::Auto, budget);
                    let peak = estimate(
                        &cfg,
                        &Workload {
                            keep_blocks: keep,
                            ..w.clone()
                        },
                    )
                    .train_peak;
                    println!(
                        "  {name} fits{}, estimated peak {:.1} GB: {}",
                        if preferred { " (recommended)" } else { "" },
                        peak as f64 / GB,
                        flags(&w, cfg.num_hidden_layers, quantized)
                    )
                }
                Err(peak) => println!(
                    "  {name} does not fit: {:.1} GB even at batch 1 × 256, rank 4, one block",
                    peak as f64 / GB
                ),
            }
        }
        if let Some(b) = saved
            .as_ref()
            .and_then(|s| s.best.get(&setup_file::model_key(alias)))
        {
            println!(
                "  benchmarked here: batch {} × length {}, rank {} at {:.1} tokens/s (use train --auto-optimize)",
                b.batch_size, b.max_seq_length, b.lora_rank, b.tokens_per_s
            );
        }
    }
    if !crate::engine::choice::gpu_build() {
        println!(
            "\nThis build trains on the CPU; for a GPU build MLX's: scripts/build_mlx.sh --cuda \
             (NVIDIA), or scripts/build_mlx.sh on a Mac."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_shrink_until_the_estimate_is_under_budget() {
        let cfg = presets::alias_shape("llama-8b").unwrap();
        let p = presets::preset_for(128_000_000_000);
        let dense = WeightFormat::Dense(2.0);
        let (w, peak) = fit(&cfg, &p, dense, 2, 100_000_000_000).unwrap();
        assert_eq!((w.batch_size, w.seq_len, w.lora_rank), (8, 2048, 64));
        assert!(peak <= 100_000_000_000);
        // 8B in bf16 needs 16 GB of weights alone: 12 GB cannot hold it, 4-bit can.
        assert!(fit(&cfg, &p, dense, 2, 12_000_000_000).is_err());
        let q4 = WeightFormat::quantized(QuantBits::Four, 2.0);
        let (w, peak) = fit(&cfg, &p, q4, 2, 12_000_000_000).unwrap();
        assert!(peak <= 12_000_000_000 && w.batch_size < 8, "{w:?}");
    }
}
