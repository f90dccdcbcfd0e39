//! The flags that choose a model and how it is loaded, declared once for every command that
//! loads one.

use super::load::LoadOptions;
use super::quantized::QuantBits;
use crate::error::Result;
use crate::runtime::device::{
    cpu_auto_weights, select_device, select_dtype, DTypeChoice, DeviceChoice,
};
use candle_core::DType;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which model, on which device, in which dtype.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Model")]
pub struct ModelArgs {
    /// Hugging Face model directory, .gguf file, alias (e.g. llama-8b) or org/name repo id.
    #[arg(short, long)]
    pub model: String,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Dtype of the weights and the arithmetic; auto is bf16 on a GPU and f32 on the CPU. On
    /// the CPU every command that runs the model holds bf16/f16 weights at half size and
    /// computes in f32; under auto it holds a checkpoint stored in bf16/f16 so (without
    /// `--quantize`; the candle engine).
    #[arg(long, value_enum, default_value_t = DTypeChoice::Auto)]
    pub dtype: DTypeChoice,
}

/// `--quantize`: the frozen weights kept quantized in memory (QLoRA).
#[derive(Debug, Clone, Copy, Default, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Model")]
pub struct QuantizeArgs {
    /// Keep the frozen block weights quantized in memory: 4 (Q4_1) or 8 (Q8_0); a quantized
    /// GGUF keeps its own quantization.
    #[arg(long, value_name = "BITS", value_parser = parse_quantize)]
    pub quantize: Option<QuantBits>,
}

fn parse_quantize(s: &str) -> Result<QuantBits, String> {
    s.parse::<u8>()
        .ok()
        .and_then(QuantBits::parse)
        .ok_or_else(|| "give 4 or 8 (bits per weight: 4 is Q4_1, 8 is Q8_0)".into())
}

impl ModelArgs {
    /// How these flags and `--quantize` ask for the model to be loaded (the device is probed
    /// here, once).
    pub fn load_options(&self, quantize: Option<QuantBits>) -> Result<LoadOptions> {
        let device = select_device(self.device)?;
        let dtype = select_dtype(self.dtype, &device);
        Ok(LoadOptions::new(device, dtype, quantize))
    }

    /// How `train` and `eval` load the model: as [`ModelArgs::load_options`], computing in f32
    /// on the CPU ([`LoadOptions::for_kernels`]). With `--dtype auto` on the CPU, block linears
    /// the checkpoint stores in bf16/f16 (`stored`, from [`super::inspect`]) are kept so: the
    /// same values as in f32, in half the memory.
    pub fn kernel_load_options(
        &self,
        quantize: Option<QuantBits>,
        stored: Option<DType>,
    ) -> Result<LoadOptions> {
        Ok(self.for_kernels(self.load_options(quantize)?, stored))
    }

    /// `opts` (from [`ModelArgs::load_options`]) as [`ModelArgs::kernel_load_options`] makes
    /// them.
    fn for_kernels(&self, opts: LoadOptions, stored: Option<DType>) -> LoadOptions {
        if self.dtype == DTypeChoice::Auto && opts.device.is_cpu() {
            let weights = cpu_auto_weights(stored, opts.quantize.is_some());
            return LoadOptions::new(opts.device, weights, opts.quantize).for_kernels();
        }
        opts.for_kernels()
    }
}

/// A model to run, with its quantization and an optional adapter (`generate`, `eval`,
/// `validate`).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    /// A LoRA adapter directory (PEFT layout) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl RunArgs {
    /// The model for decoding (`generate`, `chat`, `validate`): as [`RunArgs::load`], except
    /// that without `--quantize` a GGUF keeps the quantization its block linears are stored in
    /// when the decoding kernel reads it ([`decode_options`]).
    pub fn load_for_decoding(&self, with_adapter: bool) -> Result<super::LoadedModel> {
        let opts = decode_options(&self.model, self.quantize.quantize)?;
        let adapter = self.adapter.as_deref().filter(|_| with_adapter);
        super::load(&self.model.model, &opts, adapter)
    }

    /// The model for scoring (`eval`) as these flags ask, with the adapter applied when
    /// `with_adapter`: as training computes, so the losses are train's validation losses.
    pub fn load(&self, with_adapter: bool) -> Result<super::LoadedModel> {
        let stored = super::inspect(&self.model.model)?.matrix_dtype;
        let opts = self
            .model
            .kernel_load_options(self.quantize.quantize, stored)?;
        let adapter = self.adapter.as_deref().filter(|_| with_adapter);
        super::load(&self.model.model, &opts, adapter)
    }
}

/// How a model is loaded for decoding. Decoding reads every weight once per token, so it is
/// bound by their size. On the CPU:
/// - without `--quantize` or `--dtype`, a GGUF whose block linears are all stored quantized
///   keeps them so, as llama.cpp runs it, and decoding reads their blocks (our kernel for
///   Q4_0/Q4_1/Q8_0, candle's for the k-quants; both round the input to 8 bits as llama.cpp
///   does). `--dtype f32` asks for the dense, dequantized weights;
/// - otherwise the model loads as `train` and `eval` load it
///   ([`ModelArgs::kernel_load_options`]): a checkpoint stored in bf16/f16 keeps its weights
///   so (a GGUF when all its matrices share that format), and decoding reads them at that
///   size, computing in f32. `--dtype bf16|f16` holds any checkpoint's weights so.
///
/// Elsewhere, as [`ModelArgs::load_options`] says.
pub fn decode_options(model: &ModelArgs, quantize: Option<QuantBits>) -> Result<LoadOptions> {
    use candle_core::quantized::GgmlDType as G;
    let opts = model.load_options(quantize)?;
    if !opts.device.is_cpu() {
        return Ok(opts);
    }
    if quantize.is_some() || model.dtype != DTypeChoice::Auto {
        return Ok(model.for_kernels(opts, None));
    }
    // The dtype the checkpoint's matrices are stored in, for a dense load.
    let dense = |opts: LoadOptions| -> Result<LoadOptions> {
        let stored = super::inspect(&model.model)?.matrix_dtype;
        Ok(model.for_kernels(opts, stored))
    };
    let Ok(super::source::ModelSource::Gguf(path)) = super::source::resolve(&model.model) else {
        return dense(opts);
    };
    let formats = crate::weights::GgufFile::open(&path)?.linear_formats();
    let stored_quantized = |f: &G| !matches!(f, G::F32 | G::F16 | G::BF16);
    let bits = if formats.is_empty() || !formats.iter().all(stored_quantized) {
        return dense(opts);
    } else if formats == [G::Q8_0] {
        QuantBits::Eight
    } else {
        QuantBits::Four
    };
    let names: Vec<String> = formats.iter().map(|f| ggml_name(*f)).collect();
    eprintln!(
        "note: decoding with the GGUF's own {} weights, read block by block (--dtype f32 for dense, dequantized weights)",
        names.join("/")
    );
    Ok(LoadOptions {
        quantize: Some(bits),
        ..opts
    })
}

/// llama.cpp's name of a GGML block format (`Q4_K` where candle says `Q4K`).
fn ggml_name(f: candle_core::quantized::GgmlDType) -> String {
    let name = format!("{f:?}");
    match name.strip_suffix('K') {
        Some(stem) if !stem.contains('_') => format!("{stem}_K"),
        _ => name,
    }
}
