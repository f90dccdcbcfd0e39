//! The command line: one struct per subcommand, built from flag groups that are each declared
//! once, with their defaults (which `--help` prints), beside what they configure. Parsing has no side effects:
//! it reads the command line and, for `train --config FILE.yaml`, that file ([`config_file`]).

mod config_file;

// The flag groups, each declared once beside what it configures.
pub use crate::data::args::{BatchArgs, DataArgs};
pub use crate::distrust::args::DistrustArgs;
pub use crate::infer::generate::{KvCacheArgs, SamplingArgs};
pub use crate::model::args::{ModelArgs, QuantizeArgs, RunArgs};
pub use crate::train::settings::{
    BudgetArgs, LoraArgs, MemoryArgs, ObjectiveArgs, OutputArgs, ScheduleArgs,
};

use crate::error::Result;
use crate::runtime::device::DTypeChoice;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::ffi::OsString;
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
    /// Compute threads [default: the physical cores; RAYON_NUM_THREADS also works]. Hyper-threads
    /// share a core's vector units, so more threads than cores only adds contention.
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a reply to a prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Serve the model, and adapters by name, over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Chat with the model in the terminal; the conversation is kept from turn to turn.
    Chat(ChatArgs),
    /// Mean cross-entropy and perplexity of a model on a JSONL dataset.
    Eval(EvalArgs),
    /// Fine-tune a LoRA adapter on a JSONL dataset.
    Train(Box<TrainArgs>),
    /// List the model aliases and which are in the local Hugging Face cache.
    Models,
    /// Merge a LoRA adapter into the base weights; write a Hugging Face directory or a GGUF file.
    Fuse(FuseArgs),
    /// Write a LoRA adapter as a GGUF file that llama.cpp's --lora loads.
    ExportAdapter(ExportAdapterArgs),
    /// Print the pre-flight memory estimate of a training run (only the model's config is read:
    /// a config.json alone is enough).
    Estimate(EstimateArgs),
    /// Run a few training steps of configurations from small to large (each in its own
    /// process), report speed and peak memory beside the estimate, and recommend the fastest
    /// that fits the budget.
    Benchmark(BenchmarkArgs),
    /// Show the detected hardware and, for each model alias, whether LoRA and QLoRA fit the
    /// memory budget, with the flags to use.
    Recommend(RecommendArgs),
    /// Detect the hardware and save it (with benchmark results) to the setup file that
    /// `recommend`, `benchmark` and `train --auto-optimize` read.
    Setup,
    /// Add auth_weight and prov_entropy (the citation scorer's) to every row of a JSONL file.
    Score(ScoreArgs),
    /// Build a distrust training set: score, drop duplicates, rebalance, split train/valid.
    Prepare(PrepareArgs),
    /// Run a prompt suite through a model (and adapter) and report pass rates per category.
    Validate(ValidateArgs),
}

#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// Assume a machine with this much memory (GB) instead of the detected one.
    #[arg(long, value_name = "GB", value_parser = crate::train::settings::parse_gb,
          allow_hyphen_values = true)]
    pub memory: Option<f64>,
}

#[derive(Debug, Args)]
pub struct BenchmarkArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Write the results as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// A small grid (batch 1 and 4, length 128 and 512, rank 8).
    #[arg(long)]
    pub quick: bool,
    /// Training steps per configuration (the first is left out of the speed when there are more).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Batch sizes to try.
    #[arg(long, default_value = "1,2,4,8")]
    pub batch_sizes: String,
    /// Sequence lengths to try.
    #[arg(long, default_value = "128,256,512,1024")]
    pub lengths: String,
    /// LoRA ranks to try.
    #[arg(long, default_value = "8,16,32,64")]
    pub ranks: String,
    /// Base precisions to try, comma-separated: none (the model's own dtype), 4 or 8 (QLoRA:
    /// frozen block weights kept at that many bits).
    #[arg(long = "quantize", default_value = "none")]
    pub quantize_list: String,
    /// The engine every run uses (see `train --engine`); its own default where not given.
    #[arg(long, value_enum)]
    pub engine: Option<crate::engine::choice::EngineChoice>,
    /// For tests: passed to every child run (see `train --test-memory-limit`).
    #[arg(long, hide = true, value_name = "BYTES@STEP",
          value_parser = crate::train::settings::parse_test_limit)]
    pub test_memory_limit: Option<(u64, usize)>,
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// A config.json, Hugging Face model directory, .gguf file or alias (cached).
    #[arg(short, long)]
    pub model: String,
    /// The engine whose step to model (see `train --engine`): candle unless given. The MLX
    /// engine's estimate needs no MLX in this binary.
    #[arg(long, value_enum)]
    pub engine: Option<crate::engine::choice::EngineChoice>,
    /// Dtype of the frozen weights, as `train --dtype` takes it. auto: bf16 with `--device
    /// cuda|metal`; on the CPU the checkpoint's own bf16/f16 (from its weights' headers, or its
    /// config's torch_dtype for a config or an alias not downloaded), f32 with `--quantize`,
    /// `--engine mlx` or a checkpoint in any other dtype.
    #[arg(long, value_enum, default_value_t = DTypeChoice::Auto)]
    pub dtype: DTypeChoice,
    /// The device whose step to model: cpu (the fused kernels; bf16/f16 weights computed in
    /// f32, as `train` does there) or a GPU, cuda/metal (candle's ops in the dtype) [default:
    /// a GPU for bf16/f16 given, else the CPU].
    #[arg(long, value_enum)]
    pub device: Option<crate::runtime::device::DeviceChoice>,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Adapted blocks that keep their activations, as `train` takes it: auto (as many as 90%
    /// of the budget has room for), none, all, or a number.
    #[arg(long, default_value = "auto")]
    pub keep_activations: crate::train::settings::KeepActivations,
    /// Rows packed with several examples, as `train --pack` makes them (each row then has its
    /// own attention mask).
    #[arg(long)]
    pub pack: bool,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Prompt suite JSONL [default: the built-in authority-bias and refusal suite].
    #[arg(long)]
    pub suite: Option<PathBuf>,
    /// Run the base model and the adapter side by side (needs --adapter).
    #[arg(long)]
    pub compare: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Replace an existing --output file.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The user message (or, with --raw, the exact text to continue).
    #[arg(short, long)]
    pub prompt: String,
    /// A system message placed before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Hold the reply to one JSON object (each token sampled among those that keep it one);
    /// the prompt should still say what the object holds.
    #[arg(long)]
    pub json: bool,
    /// Hold the reply to a document of the JSON Schema in FILE (an object at its root).
    #[arg(long, value_name = "FILE", conflicts_with = "json")]
    pub json_schema: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// A system message that opens the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    /// An adapter to serve under a name, NAME=DIR (a PEFT LoRA directory); repeat for more. A
    /// request's `model` field picks it by NAME; the base model answers under its own name.
    #[arg(long, value_name = "NAME=DIR", value_parser = parse_named_adapter)]
    pub adapter: Vec<(String, PathBuf)>,
    /// Address to listen on; the default takes requests from this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the URL printed says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long, env = "YOUR_AI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Let web pages from ORIGIN (`http://localhost:3000`) call the API from a browser (CORS);
    /// repeat it for more, or give `*` for any. Without it, browsers refuse such calls.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origin: Vec<String>,
    /// A Jinja chat template to render conversations with, instead of the model's own (one
    /// that takes `tools`, say).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    #[command(flatten)]
    pub kv: KvCacheArgs,
}

fn parse_named_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!(
            "give NAME=DIR, for example --adapter brellonia=models/demo-brellonia (got `{s}`)"
        )),
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// A JSONL file, or a directory (valid.jsonl is used, else test.jsonl, else train.jsonl).
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// sft: loss and perplexity; dpo or orpo: the preference loss and reward accuracy of the
    /// adapter on preference pairs.
    #[command(flatten)]
    pub objective: ObjectiveArgs,
}

/// `your_ai train`: the flag groups a run is configured by. Every flag can also come from
/// `--config FILE.yaml` (keys as the flag names, with `-` or `_`); the command line wins.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct TrainArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub quantize: QuantizeArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub objective: ObjectiveArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub schedule: ScheduleArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub distrust: DistrustArgs,
    /// Which engine does the arithmetic: candle (the default on the CPU) or mlx (the default
    /// for --device metal, and on macOS for --device auto, in a binary built with the `mlx`
    /// feature).
    #[arg(long, value_enum)]
    pub engine: Option<crate::engine::choice::EngineChoice>,
    /// A YAML file of flag values (keys as the flag names, with - or _); the command line wins.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Use the best configuration `your_ai benchmark` saved for this model (running a quick
    /// benchmark first if there is none); flags given on the command line or in --config win.
    #[arg(long)]
    pub auto_optimize: bool,
    /// Resume from the latest checkpoint of --output, or from PATH (a checkpoint or an output directory).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<String>,
    /// The settings given on the command line or in the --config file, by name
    /// (`lora_rank`): what --auto-optimize leaves alone.
    #[arg(skip)]
    #[serde(skip)]
    pub given: BTreeSet<String>,
}

impl TrainArgs {
    /// Folds each `--no-X` into its `X`, so the positive field alone says what holds.
    fn normalize(&mut self) {
        self.data.mask_prompt &= !self.data.no_mask_prompt;
        self.data.no_mask_prompt = false;
        self.output.save_best &= !self.output.no_save_best;
        self.output.no_save_best = false;
    }
}

/// A value as its flag spells it (`q4_k_m`, `bf16`), not as Rust's `Debug` does (`Q4KM`, `Bf16`).
pub fn flag_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

/// Parses the command line (and, for `train --config FILE.yaml`, the file: its values apply
/// where the command line gave none).
pub fn parse() -> Result<Cli> {
    parse_from(std::env::args_os())
}

/// [`parse`] of the given arguments (the first is the program name).
pub fn parse_from<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I) -> Result<Cli> {
    let matches = Cli::command()
        .args_override_self(true)
        .get_matches_from(args);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Train(a), Some(m)) = (&mut cli.command, matches.subcommand_matches("train")) {
        a.given = m
            .ids()
            .filter(|id| {
                m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.to_string())
            .collect();
        a.normalize();
        if let Some(path) = a.config.clone() {
            config_file::merge(a, &path)?;
            a.normalize();
        }
    }
    Ok(cli)
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// JSONL rows with `text` (or prompt/completion, or messages) and optional metadata:
    /// source, url, publisher, year or date, source_type.
    #[arg(short, long)]
    pub input: PathBuf,
    /// Where the scored rows go (written whole, or not at all).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// JSONL files; rows without auth_weight and prov_entropy are scored.
    #[arg(short, long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Directory for train.jsonl and valid.jsonl.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Target share of low-authority examples (auth_weight below 0.3) after rebalancing.
    #[arg(long, default_value_t = crate::distrust::prepare::DEFAULT_LOW_AUTHORITY_SHARE)]
    pub low_authority_share: f64,
    /// Keep every example: no rebalancing.
    #[arg(long)]
    pub no_rebalance: bool,
    /// Share of examples held out for valid.jsonl.
    #[arg(long, default_value_t = 0.1)]
    pub valid_fraction: f64,
    /// Seed of the rebalancing and the split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also draw the w and H histograms into this PNG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Replace existing train.jsonl / valid.jsonl in --output.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct FuseArgs {
    /// The base model the adapter was trained on (directory, .gguf, alias or repo id).
    #[arg(short, long)]
    pub model: String,
    /// The LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write: a directory for --format hf, a .gguf file for --format gguf.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Output format [default: gguf when --output ends in .gguf, else hf].
    #[arg(long, value_enum)]
    pub format: Option<crate::export::Format>,
    /// Tensor type of a GGUF output (norms stay F32).
    #[arg(long, value_enum, default_value_t = crate::export::GgufType::F16)]
    pub gguf_type: crate::export::GgufType,
    /// Dtype of a Hugging Face output.
    #[arg(long, value_enum, default_value_t = crate::export::HfDtype::Auto)]
    pub hf_dtype: crate::export::HfDtype,
    /// Allow merging into a quantized base by dequantizing it first.
    #[arg(long)]
    pub dequantize: bool,
    /// After fusing, report validation loss of base + adapter and of the merged model on this
    /// JSONL file or directory (valid.jsonl, else test.jsonl, else train.jsonl).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Replace --output if it exists.
    #[arg(long)]
    pub force: bool,
    /// Safetensors shard size in bytes for a Hugging Face output (at least 1).
    #[arg(long, default_value_t = crate::export::hf_dir::DEFAULT_SHARD_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_shard_size: u64,
    /// Longer validation examples are truncated to this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_length: usize,
}

#[derive(Debug, Args)]
pub struct ExportAdapterArgs {
    /// The LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The GGUF file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// The base model [default: base_model_name_or_path from adapter_config.json].
    #[arg(short, long)]
    pub model: Option<String>,
    /// Replace --output if it exists.
    #[arg(long)]
    pub force: bool,
}
