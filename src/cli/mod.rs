//! The command line: one struct per subcommand. Defaults are defined here once and `--help`
//! prints them from here.

use crate::error::{Error, Result};
use crate::runtime::device::{DTypeChoice, DeviceChoice};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

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
    #[arg(long, value_name = "GB")]
    pub memory: Option<f64>,
}

#[derive(Debug, Args)]
pub struct BenchmarkArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Memory budget in GB [default: 80% of the device's memory, at most 120 GB].
    #[arg(long, value_name = "GB")]
    pub max_memory: Option<f64>,
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
    #[arg(long, default_value = "none")]
    pub quantize: String,
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// A config.json, Hugging Face model directory, .gguf file or alias (cached).
    #[arg(short, long)]
    pub model: String,
    /// Dtype of the frozen weights and activations: f32 (CPU) or bf16/f16 (GPUs).
    #[arg(long, value_enum, default_value_t = DTypeChoice::F32)]
    pub dtype: DTypeChoice,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_length: usize,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// Linear layers that get adapters (comma-separated: q,k,v,o,gate,up,down).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: Vec<String>,
    /// Adapters on the last N blocks only [default: all].
    #[arg(long)]
    pub num_layers: Option<usize>,
    /// Estimate with the frozen linear layers quantized to 4 or 8 bits.
    #[arg(long)]
    pub quantize: Option<u8>,
    /// Compare with this budget (GB).
    #[arg(long, value_name = "GB")]
    pub max_memory: Option<f64>,
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
pub struct ValidateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A LoRA adapter directory (PEFT layout) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompt suite JSONL [default: the built-in authority-bias and refusal suite].
    #[arg(long)]
    pub suite: Option<PathBuf>,
    /// Run the base model and the adapter side by side (needs --adapter).
    #[arg(long)]
    pub compare: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Most tokens generated per prompt.
    #[arg(long, default_value_t = 160)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
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
    /// A LoRA adapter directory (PEFT layout) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
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
    /// Keep the frozen block weights quantized in memory: 4 (Q4_1) or 8 (Q8_0); a quantized
    /// GGUF keeps its own quantization.
    #[arg(long)]
    pub quantize: Option<u8>,
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
    /// A LoRA adapter directory (PEFT layout) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
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
    /// Keep the frozen block weights quantized in memory: 4 (Q4_1) or 8 (Q8_0); a quantized
    /// GGUF keeps its own quantization.
    #[arg(long)]
    pub quantize: Option<u8>,
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
    /// Safetensors shard size in bytes for a Hugging Face output.
    #[arg(long, default_value_t = crate::export::hf_dir::DEFAULT_SHARD_BYTES)]
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

/// `your_ai train`. Every flag can also come from `--config FILE.yaml` (keys as the flag names,
/// with `-` or `_`); the command line wins.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: a directory with train.jsonl (and valid.jsonl, test.jsonl) or one JSONL file.
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// Where the adapter, checkpoints and metrics go [default: models/<model-name>-lora].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// A YAML file of flag values.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Examples per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Optimizer steps to run (one step = one progress-bar step).
    #[arg(
        long,
        visible_alias = "iters",
        default_value_t = 5000,
        conflicts_with = "epochs"
    )]
    pub max_steps: usize,
    /// Train for this many passes over the data instead of --max-steps.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Longer examples are truncated (and counted in a warning).
    #[arg(long, default_value_t = 1024)]
    pub max_seq_length: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accumulation_steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    /// Learning-rate decay after warmup.
    #[arg(long, value_enum, default_value_t = crate::train::schedule::ScheduleKind::Cosine)]
    pub lr_schedule: crate::train::schedule::ScheduleKind,
    /// Linear warmup steps (never more than the run's steps).
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    /// Learning-rate floor at the end of the decay.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed for adapter initialisation and data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank) [default: 2 × rank].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input during training.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Linear layers that get adapters (comma-separated: q,k,v,o,gate,up,down).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: Vec<String>,
    /// Adapters on the last N blocks only; the backward stops there [default: all].
    #[arg(long)]
    pub num_layers: Option<usize>,

    /// Train only assistant turns and completions (the default).
    #[arg(long, overrides_with = "no_mask_prompt")]
    pub mask_prompt: bool,
    /// Train on every token, prompts included.
    #[arg(long)]
    pub no_mask_prompt: bool,
    /// Pack several examples per row (attention and positions stay per example).
    #[arg(long)]
    pub pack: bool,

    /// Validation every N steps (also at step 0 and at the end; 0: only those).
    #[arg(long, default_value_t = 200)]
    pub steps_per_eval: usize,
    /// Validation batches per evaluation (0: the whole validation set).
    #[arg(long, default_value_t = 25)]
    pub val_batches: usize,
    /// Save a checkpoint every N steps under <output>/checkpoints (also at the end).
    #[arg(long, default_value_t = 500)]
    pub save_every: usize,
    /// Checkpoints kept under <output>/checkpoints (the newest).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Per-step metrics as JSON lines [default: <output>/metrics.jsonl].
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
    /// Report test-set loss and perplexity at the end.
    #[arg(long)]
    pub test: bool,
    /// Keep the adapter with the best validation loss in <output>/best (the default).
    #[arg(long, overrides_with = "no_save_best")]
    pub save_best: bool,
    /// Do not keep a best-validation adapter.
    #[arg(long)]
    pub no_save_best: bool,
    /// Print a memory line every N steps.
    #[arg(long)]
    pub memory_report_interval: Option<usize>,
    /// Print the time spent in each phase of the training step at the end.
    #[arg(long)]
    pub profile: bool,
    /// Adapted blocks that keep their activations for the backward instead of recomputing
    /// them: auto (as many as 90% of the memory budget has room for: no recompute when memory
    /// allows), none (the smallest peak, one extra forward per step), all, or a number.
    #[arg(long, default_value = "auto")]
    pub keep_activations: crate::train::config::KeepActivations,

    /// Weight each example's loss by its distrust D (on by default when the training rows have
    /// auth_weight and prov_entropy; see `your_ai score`).
    #[arg(long, overrides_with = "no_distrust")]
    pub distrust: bool,
    /// Plain training even when the rows carry auth_weight and prov_entropy.
    #[arg(long)]
    pub no_distrust: bool,
    /// α of D = α·(ln(1 − w + 1e-8) + H)² (valid range 2.3–3.0).
    #[arg(long, default_value_t = crate::distrust::formula::DEFAULT_ALPHA)]
    pub alpha: f64,
    /// λ in [0, 1]: example weight c = (1 − λ) + λ·D/mean(D); 0 is plain training.
    #[arg(long, default_value_t = crate::distrust::formula::DEFAULT_LAMBDA)]
    pub lambda_weight: f64,

    /// Memory budget in GB [default: 80% of the device's memory, at most 120 GB]. A run whose
    /// estimate exceeds it does not start; one that crosses it saves a checkpoint and stops.
    #[arg(long, value_name = "GB")]
    pub max_memory: Option<f64>,
    /// When the estimate exceeds the budget, train with the largest batch size that fits
    /// instead of refusing.
    #[arg(long)]
    pub auto_fit: bool,
    /// Use the best configuration `your_ai benchmark` saved for this model (running a quick
    /// benchmark first if there is none); flags given on the command line still win.
    #[arg(long)]
    pub auto_optimize: bool,
    /// Every N steps: checkpoint, drop the model, adapter and optimizer, reload them and go on.
    /// A workaround other tools need for memory that grows step by step; your_ai's steps are
    /// flat, so it is not needed, but it works exactly (same losses and adapter).
    #[arg(long, value_name = "N")]
    pub reload_interval: Option<usize>,
    /// Keep the frozen block weights quantized in memory (QLoRA): 4 (Q4_1) or 8 (Q8_0); a
    /// quantized GGUF keeps its own quantization.
    #[arg(long)]
    pub quantize: Option<u8>,
    /// Resume from the latest checkpoint of --output, or from PATH (a checkpoint or an output directory).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<String>,
}

/// Parses the command line; for `train --config FILE.yaml`, the file's values go in first so
/// that flags given on the command line win.
pub fn parse() -> Result<Cli> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let argv = match config_path(&argv) {
        Some(path) => with_yaml_args(argv, &path)?,
        None => argv,
    };
    let argv = with_auto_optimize_args(argv)?;
    let matches = Cli::command()
        .args_override_self(true)
        .get_matches_from(argv);
    Cli::from_arg_matches(&matches).map_err(|e| e.exit())
}

/// For `train --auto-optimize`: the saved best configuration's flags go in first, so that
/// flags from the command line and the YAML file win.
fn with_auto_optimize_args(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let args: Vec<&str> = argv.iter().filter_map(|a| a.to_str()).collect();
    let Some(train) = args.iter().position(|a| *a == "train") else {
        return Ok(argv);
    };
    let rest = &args[train + 1..];
    if !rest.contains(&"--auto-optimize") {
        return Ok(argv);
    }
    let model = rest.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix("--model=") {
            Some(v.to_string())
        } else if *a == "--model" || *a == "-m" {
            rest.get(i + 1).map(|s| s.to_string())
        } else {
            None
        }
    });
    let Some(model) = model else {
        return Ok(argv); // clap reports the missing --model
    };
    let extra = crate::runtime::setup_file::auto_optimize_args(&model)?;
    let mut out = argv[..=train].to_vec();
    out.extend(extra.into_iter().map(OsString::from));
    out.extend_from_slice(&argv[train + 1..]);
    Ok(out)
}

/// The value of `--config` when the subcommand is `train`.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let args: Vec<&str> = argv.iter().filter_map(|a| a.to_str()).collect();
    let train = args.iter().position(|a| *a == "train")?;
    let rest = &args[train + 1..];
    rest.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix("--config=") {
            Some(PathBuf::from(v))
        } else if *a == "--config" {
            rest.get(i + 1).map(PathBuf::from)
        } else {
            None
        }
    })
}

/// Inserts `--key value` pairs from the YAML mapping right after `train`.
fn with_yaml_args(argv: Vec<OsString>, path: &Path) -> Result<Vec<OsString>> {
    let bad = |msg: String| Error::Usage(format!("--config {}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| bad(format!("not valid YAML: {e}")))?;
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => Default::default(),
        _ => return Err(bad("expected a mapping of flag names to values".into())),
    };
    let cmd = Cli::command();
    let train = cmd.find_subcommand("train").expect("train subcommand");
    let known: Vec<String> = train
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let mut extra: Vec<OsString> = vec![];
    for (k, v) in map {
        let key = k
            .as_str()
            .ok_or_else(|| bad(format!("key {k:?} is not a string")))?
            .replace('_', "-");
        if !known.contains(&key) || key == "config" {
            return Err(bad(format!(
                "`{key}` is not a train flag (see `your_ai train --help`)"
            )));
        }
        let scalar = |v: &serde_yaml::Value| -> Result<String> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                _ => Err(bad(format!(
                    "`{key}` must be a number, string, boolean or list"
                ))),
            }
        };
        match &v {
            serde_yaml::Value::Null => {}
            serde_yaml::Value::Bool(true) => extra.push(format!("--{key}").into()),
            serde_yaml::Value::Bool(false) => {
                let negated = format!("no-{key}");
                if key.starts_with("no-") || !known.contains(&negated) {
                    return Err(bad(format!(
                        "`{key}: false` cannot be expressed; leave the key out"
                    )));
                }
                extra.push(format!("--{negated}").into());
            }
            serde_yaml::Value::Sequence(items) => {
                let parts: Vec<String> = items.iter().map(scalar).collect::<Result<_>>()?;
                extra.push(format!("--{key}={}", parts.join(",")).into());
            }
            other => extra.push(format!("--{key}={}", scalar(other)?).into()),
        }
    }
    let pos = argv
        .iter()
        .position(|a| a == "train")
        .map(|p| p + 1)
        .unwrap_or(argv.len());
    let mut out = argv[..pos].to_vec();
    out.extend(extra);
    out.extend_from_slice(&argv[pos..]);
    Ok(out)
}
