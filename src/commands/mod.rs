//! One module per subcommand: each turns parsed flags into calls on the library.

pub mod benchmark;
pub mod estimate;
pub mod eval;
pub mod export_adapter;
pub mod fuse;
pub mod generate;
pub mod models;
pub mod prepare;
pub mod recommend;
pub mod score;
pub mod setup;
pub mod train;
pub mod validate;

use crate::cli::{Cli, Command, ModelArgs};
use crate::error::Result;
use crate::model::lora::Adapter;
use crate::model::quantized::QuantBits;
use crate::model::LoadedModel;
use crate::runtime::device::{select_device, select_dtype};
use std::path::Path;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run(*args),
        Command::Models => models::run(),
        Command::Fuse(args) => fuse::run(args),
        Command::ExportAdapter(args) => export_adapter::run(args),
        Command::Estimate(args) => estimate::run(args),
        Command::Benchmark(args) => benchmark::run(args),
        Command::Recommend(args) => recommend::run(args),
        Command::Setup => setup::run(),
        Command::Score(args) => score::run(args),
        Command::Prepare(args) => prepare::run(args),
        Command::Validate(args) => validate::run(args),
    }
}

/// Loads the model named by the shared model flags.
pub fn load_model(args: &ModelArgs) -> Result<LoadedModel> {
    load_model_quantized(args, None)
}

/// As [`load_model`], with `--quantize 4|8` (block weights kept quantized; see README).
pub fn load_model_quantized(args: &ModelArgs, quantize: Option<u8>) -> Result<LoadedModel> {
    let quant = quant_flag(quantize)?;
    let device = select_device(args.device)?;
    let dtype = select_dtype(args.dtype, &device);
    tracing::info!("loading {} on {:?} in {:?}", args.model, device, dtype);
    let loaded = crate::model::load_with(&args.model, &device, dtype, quant)?;
    if quant.is_some() {
        tracing::info!(
            "frozen weights: {:.1} MB as loaded",
            loaded.model.frozen_weight_bytes() as f64 / 1e6
        );
    }
    Ok(loaded)
}

/// `--quantize N` checked: 4 or 8.
pub fn quant_flag(quantize: Option<u8>) -> Result<Option<QuantBits>> {
    match quantize {
        None => Ok(None),
        Some(b) => QuantBits::parse(b).map(Some).ok_or_else(|| {
            crate::error::Error::Usage(format!(
                "--quantize {b}: use 4 (Q4_1, 32-weight groups with scale and offset) or 8 (Q8_0)"
            ))
        }),
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
    use crate::train::estimate::WeightFormat;
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

/// Loads the model and, when given, applies a PEFT LoRA adapter to it.
pub fn load_model_with_adapter(args: &ModelArgs, adapter: Option<&Path>) -> Result<LoadedModel> {
    load_model_with_adapter_quantized(args, adapter, None)
}

/// As [`load_model_with_adapter`], with `--quantize`.
pub fn load_model_with_adapter_quantized(
    args: &ModelArgs,
    adapter: Option<&Path>,
    quantize: Option<u8>,
) -> Result<LoadedModel> {
    let mut loaded = load_model_quantized(args, quantize)?;
    if let Some(dir) = adapter {
        let a = Adapter::load_peft(dir, &loaded.model.cfg, &loaded.model.device)?;
        tracing::info!(
            "adapter {}: rank {}, {} parameters",
            dir.display(),
            a.cfg.rank,
            a.num_params()
        );
        loaded.model.adapter = Some(a);
    }
    Ok(loaded)
}
