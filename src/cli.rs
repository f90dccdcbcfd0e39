//! The command line: one struct per subcommand. Defaults are defined here once and `--help`
//! prints them from here.

use crate::device::{DTypeChoice, DeviceChoice};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "your_ai",
    version,
    about = "Fine-tune Llama-family chat models with LoRA and QLoRA on one machine",
    long_about = "Fine-tune Llama-family chat models (Llama 3.x, Mistral, Qwen2, SmolLM2) with LoRA and \
                  QLoRA on one machine: CPU, NVIDIA CUDA or Apple Metal.\n\n\
                  Models are given as a Hugging Face directory, a .gguf file, an alias (see \
                  `your_ai models`) or an org/name repository id."
)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a reply to a prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Mean cross-entropy and perplexity of a model on a JSONL dataset.
    Eval(EvalArgs),
    /// List the model aliases and which are in the local Hugging Face cache.
    Models,
}

/// Which model, on which device, in which dtype.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory, .gguf file, alias (e.g. llama-8b) or org/name repo id.
    #[arg(short, long)]
    pub model: String,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Compute dtype of weights and activations.
    #[arg(long, value_enum, default_value_t = DTypeChoice::Auto)]
    pub dtype: DTypeChoice,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message (or, with --raw, the exact text to continue).
    #[arg(short, long)]
    pub prompt: String,
    /// A system message placed before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A JSONL file, or a directory (valid.jsonl is used, else test.jsonl, else train.jsonl).
    #[arg(short, long)]
    pub data: PathBuf,
    /// Longer examples are truncated to this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_length: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Score every token, not just assistant turns and completions.
    #[arg(long)]
    pub no_mask_prompt: bool,
}
