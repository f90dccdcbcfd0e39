//! Getting models out: LoRA adapters merged into the base weights (`fuse`) and written as a
//! Hugging Face directory or a GGUF file, and adapters written on their own as a llama.cpp
//! LoRA GGUF (`export-adapter`). Every output is staged under a temporary name beside the
//! destination and renamed into place only when complete.

pub mod adapter_gguf;
pub mod gguf_stream;
pub mod gguf_tokenizer;
pub mod gguf_writer;
pub mod hf_dir;
pub mod merge;

use crate::error::Error;

/// Tensor types of a GGUF export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output head and some attn_v/ffn_down.
    #[value(name = "q4_k_m")]
    Q4KM,
}

/// Dtypes of a Hugging Face export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HfDtype {
    /// The base checkpoint's dtype (`torch_dtype` in config.json); f16 for a GGUF base.
    Auto,
    F32,
    F16,
    Bf16,
}

/// Output formats of `fuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Hf,
    Gguf,
}

pub(crate) fn tensor_err(what: &str, e: candle_core::Error) -> Error {
    Error::Export(format!("{what}: {e}"))
}
