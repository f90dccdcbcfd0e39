//! `your_ai benchmark`: runs a few real training steps of each configuration that may fit the
//! memory budget, each in a child process (a crash or a kill cannot take the benchmark down),
//! and reports speed and peak memory beside the pre-flight estimate; then recommends the
//! fastest configuration that fits.

use crate::cli::BenchmarkArgs;
use crate::engine::choice::EngineChoice;
use crate::error::{Error, Result};
use crate::runtime::memory::budget::{self, GB};
use crate::train::estimate::{estimate, StepKind, Workload};
use crate::train::plan::{computes_on_cpu, device_memory_for, weights_and_step};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// Text for the benchmark's rows: the bundled example dataset's sentences.
const EXAMPLE: &str = include_str!("../../examples/invented-country/train.jsonl");
/// Rows of synthetic data: enough for the largest batch.
const ROWS: usize = 64;

/// One configuration tried, and what happened.
#[derive(Debug, Clone)]
struct Trial {
    batch: usize,
    len: usize,
    rank: usize,
    /// `--quantize` (None: the model's own dtype).
    quant: Option<u8>,
    estimate: u64,
    status: String,
    ok: bool,
    steps_per_s: Option<f64>,
    tokens_per_s: Option<f64>,
    peak: Option<u64>,
    /// MLX's allocator at its peak (MLX runs; `peak` is the process's, as the estimate is,
    /// except on a GPU).
    mlx_peak: Option<u64>,
    /// The MLX engine on a GPU: its estimate, and so `peak`, are of MLX's memory.
    mlx_gpu: bool,
}

impl Trial {
    fn json(&self) -> Value {
        json!({
            "batch_size": self.batch, "max_seq_length": self.len, "lora_rank": self.rank,
            "quantize": self.quant,
            "status": self.status, "ok": self.ok, "steps_per_s": self.steps_per_s,
            "tokens_per_s": self.tokens_per_s, "peak_bytes": self.peak,
            "peak_mlx_bytes": self.mlx_peak,
            "estimate_bytes": self.estimate,
            "estimate_error": self.peak.map(|p| self.estimate as f64 / p as f64 - 1.0),
        })
    }
}

/// Every word of the example data, in order.
fn example_words() -> Vec<String> {
    let mut words = vec![];
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.extend(s.split_whitespace().map(str::to_string)),
            Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
            Value::Object(o) => o.values().for_each(|x| collect(x, out)),
            _ => {}
        }
    }
    for line in EXAMPLE.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            collect(&v, &mut words);
        }
    }
    words
}

/// A `train.jsonl` of plain-text rows, each at least `len` tokens long (a word is at least
/// one token), so every row is cut to exactly `--max-seq-length`.
fn write_data(dir: &Path, len: usize) -> Result<()> {
    let words = example_words();
    let mut text = String::new();
    for r in 0..ROWS {
        let row: Vec<&str> = (0..len + 8)
            .map(|k| words[(r * 37 + k) % words.len()].as_str())
            .collect();
        text.push_str(&json!({ "text": row.join(" ") }).to_string());
        text.push('\n');
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let path = dir.join("train.jsonl");
    std::fs::write(&path, text).map_err(|e| Error::io("write", &path, e))
}

fn parse_list(s: &str, flag: &str) -> Result<Vec<usize>> {
    let mut v = vec![];
    for part in s.split(',') {
        match part.trim().parse::<usize>() {
            Ok(n) if n > 0 => v.push(n),
            _ => {
                return Err(Error::Usage(format!(
                    "{flag} {s}: give positive numbers separated by commas, e.g. 1,2,4"
                )))
            }
        }
    }
    Ok(v)
}

/// `--quantize none,4,8` as the settings to try.
fn parse_quantize(s: &str) -> Result<Vec<Option<u8>>> {
    let mut out = vec![];
    for item in s.split(',').map(str::trim) {
        let q = match item {
            "none" | "" => None,
            "4" => Some(4),
            "8" => Some(8),
            other => {
                return Err(Error::Usage(format!(
                    "--quantize: `{other}` is not a setting; give none, 4 or 8, comma-separated"
                )))
            }
        };
        if !out.contains(&q) {
            out.push(q);
        }
    }
    Ok(out)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The last line of the child's error output that says something.
fn last_message(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message")
        .to_string()
}

/// A metrics record's `{what}` figure in the measure the estimate models: MLX's memory where
/// the MLX engine ran on a GPU (`{what}_mlx_bytes`: its arrays are in the device, and the
/// process's resident memory is the host's), else resident memory (`{what}_rss_bytes`; on the
/// CPU the MLX engine's estimate is of the process, MLX's cache included).
fn measured(record: &Value, what: &str, mlx_gpu: bool) -> Option<u64> {
    let m = if mlx_gpu { "mlx" } else { "rss" };
    record[format!("{what}_{m}_bytes").as_str()].as_u64()
}

/// Runs one configuration in a child `your_ai train`.
fn run_trial(a: &BenchmarkArgs, dir: &Path, trial: &mut Trial, budget_gb: f64) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("find", "your_ai", e))?;
    let out = dir.join(format!(
        "run-{}-{}-{}-{}",
        trial.batch,
        trial.len,
        trial.rank,
        trial.quant.unwrap_or(0)
    ));
    let mut cmd = Command::new(exe);
    cmd.args(["train", "--model", &a.model.model]);
    if let Some(q) = trial.quant {
        cmd.args(["--quantize", &q.to_string()]);
    }
    if let Some(e) = a.engine {
        cmd.args(["--engine", &format!("{e:?}").to_lowercase()]);
    }
    if let Some((bytes, step)) = a.test_memory_limit {
        cmd.args(["--test-memory-limit", &format!("{bytes}@{step}")]);
    }
    let output = cmd
        .args(["--device", &format!("{:?}", a.model.device).to_lowercase()])
        .args(["--dtype", &format!("{:?}", a.model.dtype).to_lowercase()])
        .arg("--data")
        .arg(dir.join(format!("data-{}", trial.len)))
        .arg("--output")
        .arg(&out)
        .args(["--batch-size", &trial.batch.to_string()])
        .args(["--max-seq-length", &trial.len.to_string()])
        .args(["--lora-rank", &trial.rank.to_string()])
        .args(["--max-steps", &a.steps.to_string()])
        .args(["--max-memory", &format!("{budget_gb}")])
        .args([
            "--steps-per-eval",
            "0",
            "--save-every",
            "0",
            "--no-save-best",
        ])
        .output()
        .map_err(|e| Error::io("run", "your_ai train", e))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let records: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let train: Vec<&Value> = records.iter().filter(|r| r["type"] == "train").collect();
    let start = records.iter().find(|r| r["type"] == "start");
    let load_peak = start.and_then(|r| measured(r, "load_peak", trial.mlx_gpu));
    // The estimate the child trained under: it also counts the blocks whose activations it
    // chose to keep (`--keep-activations auto`), which the parent's skip check leaves out.
    if let Some(e) = start.and_then(|r| r["estimate_peak_bytes"].as_u64()) {
        trial.estimate = e;
    }
    // Every step's, and the end record's (after the final save).
    let train_peak = records
        .iter()
        .filter(|r| r["type"] == "train" || r["type"] == "end")
        .filter_map(|r| measured(r, "train_peak", trial.mlx_gpu))
        .max();
    // `Option`'s max: the larger figure, or whichever there is.
    trial.peak = load_peak.max(train_peak);
    trial.mlx_peak = records
        .iter()
        .flat_map(|r| [&r["load_peak_mlx_bytes"], &r["train_peak_mlx_bytes"]])
        .filter_map(Value::as_u64)
        .max();
    // Steady-state speed: the first step (allocations, caches) is left out when there are more.
    let timed: Vec<&&Value> = train.iter().skip(usize::from(train.len() > 1)).collect();
    if !timed.is_empty() {
        let secs: Vec<f64> = timed
            .iter()
            .filter_map(|r| r["step_time_s"].as_f64())
            .collect();
        let tokens: f64 = timed.iter().filter_map(|r| r["tokens"].as_f64()).sum();
        let total: f64 = secs.iter().sum();
        if !secs.is_empty() && total > 0.0 {
            trial.steps_per_s = Some(1.0 / median(secs));
            trial.tokens_per_s = Some(tokens / total);
        }
    }
    trial.ok = output.status.success();
    trial.status = match output.status.code() {
        Some(0) => "ok".into(),
        // The child's own budget check stopped it (error.rs: exit status 3).
        Some(3) => "over budget (measured)".into(),
        Some(code) => format!("error (exit {code}): {}", last_message(&stderr)),
        None => {
            use std::os::unix::process::ExitStatusExt;
            match output.status.signal() {
                Some(9) => "killed by SIGKILL (the system's out-of-memory killer sends it; check the system log)".into(),
                Some(sig) => format!("killed by signal {sig}: {}", last_message(&stderr)),
                None => format!("error: {}", last_message(&stderr)),
            }
        }
    };
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

pub fn run(a: BenchmarkArgs) -> Result<()> {
    if a.steps == 0 {
        return Err(Error::Usage("--steps 0: run at least one step".into()));
    }
    let quants = parse_quantize(&a.quantize_list)?;
    let (batches, lengths, ranks) = if a.quick {
        (vec![1, 4], vec![128, 512], vec![8])
    } else {
        (
            parse_list(&a.batch_sizes, "--batch-sizes")?,
            parse_list(&a.lengths, "--lengths")?,
            parse_list(&a.ranks, "--ranks")?,
        )
    };
    if let Some(b) = batches.iter().find(|&&b| b > ROWS) {
        return Err(Error::Usage(format!(
            "--batch-sizes: {b} is above the benchmark's {ROWS} rows"
        )));
    }
    let inspected = crate::model::inspect(&a.model.model)?;
    let cfg = &inspected.cfg;
    let engine = crate::engine::choice::resolve(a.engine, a.model.device)?;
    // How each child loads the model, as its `train` will. The MLX engine loads on the host
    // and converts onto MLX's own device.
    let load_for = |quantize| match engine {
        EngineChoice::Mlx => crate::engine::choice::mlx_load_options(&a.model, quantize),
        EngineChoice::Candle => a
            .model
            .kernel_load_options(quantize, inspected.matrix_dtype),
    };
    let base = load_for(None)?;
    let (device, dtype) = (base.device, base.dtype);
    let mem = device_memory_for(engine, &device);
    let budget = budget::resolve(a.budget.max_memory, mem.total).map_err(Error::Usage)?;
    for line in budget.describe() {
        eprintln!("{line}");
    }
    let budget_gb = budget.bytes as f64 / GB;

    let dir = std::env::temp_dir().join(format!("your_ai-benchmark-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for &len in &lengths {
        write_data(&dir.join(format!("data-{len}")), len)?;
    }
    let mut trials = vec![];
    for &quant in &quants {
        let quant_bits = quant.and_then(crate::model::quantized::QuantBits::parse);
        let load = load_for(quant_bits)?;
        let (act_bytes, weight_bytes) = (
            load.dtype.size_in_bytes(),
            load.weight_dtype.size_in_bytes(),
        );
        let (weights, step) = weights_and_step(
            &inspected,
            engine,
            quant_bits,
            (act_bytes, weight_bytes),
            computes_on_cpu(engine, &device),
        );
        for &rank in &ranks {
            for &len in &lengths {
                for &batch in &batches {
                    let w = Workload {
                        batch_size: batch,
                        seq_len: len,
                        lora_rank: rank,
                        targets: crate::model::lora::Target::ALL.to_vec(),
                        adapted_layers: cfg.num_hidden_layers,
                        keep_blocks: 0,
                        dropout: false,
                        packed: false,
                        act_bytes,
                        weights,
                        load_work: inspected.load_work_bytes(quant_bits, weight_bytes),
                        step,
                    };
                    trials.push(Trial {
                        batch,
                        len,
                        rank,
                        quant,
                        estimate: estimate(cfg, &w).peak(),
                        status: String::new(),
                        ok: false,
                        steps_per_s: None,
                        tokens_per_s: None,
                        peak: None,
                        mlx_peak: None,
                        mlx_gpu: matches!(step, StepKind::Mlx { gpu: true, .. }),
                    });
                }
            }
        }
    }
    // Small to large, so a budget problem shows on the cheap runs first.
    trials.sort_by_key(|t| (t.batch * t.len, t.rank, t.quant));
    eprintln!(
        "{} configurations, {} steps each, one child process per configuration",
        trials.len(),
        a.steps
    );
    println!(
        "{:>5} {:>6} {:>4} {:>5}  {:>8} {:>9} {:>8} {:>9} {:>6}  status",
        "batch", "length", "rank", "quant", "steps/s", "tokens/s", "peak GB", "estim. GB", "error"
    );
    for t in trials.iter_mut() {
        if t.estimate > budget.bytes {
            t.status = "skipped: estimate over budget".into();
        } else {
            run_trial(&a, &dir, t, budget_gb)?;
        }
        let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
        println!(
            "{:>5} {:>6} {:>4} {:>5}  {:>8} {:>9} {:>8} {:>9.3} {:>6}  {}",
            t.batch,
            t.len,
            t.rank,
            t.quant.map_or("-".to_string(), |q| format!("{q}-bit")),
            f(t.steps_per_s, 3),
            f(t.tokens_per_s, 1),
            f(t.peak.map(|p| p as f64 / GB), 3),
            t.estimate as f64 / GB,
            t.peak.map_or("-".into(), |p| format!(
                "{:+.0}%",
                100.0 * (t.estimate as f64 / p as f64 - 1.0)
            )),
            t.status
        );
    }
    let _ = std::fs::remove_dir_all(&dir);

    let best = trials.iter().filter(|t| t.ok).max_by(|x, y| {
        x.tokens_per_s
            .unwrap_or(0.0)
            .total_cmp(&y.tokens_per_s.unwrap_or(0.0))
    });
    let command = best.map(|t| {
        format!(
            "your_ai train --model {} --batch-size {} --max-seq-length {} --lora-rank {}{} --max-memory {:.2}",
            a.model.model,
            t.batch,
            t.len,
            t.rank,
            t.quant.map_or(String::new(), |q| format!(" --quantize {q}")),
            // To the hundredth: to the tenth, 0.85 read as 0.8, under the budget measured.
            budget_gb
        )
    });
    match (&best, &command) {
        (Some(t), Some(c)) => println!(
            "\nFastest configuration that fits: batch {} × length {}, rank {} ({:.1} tokens/s, peak {:.2} GB):\n  {c}",
            t.batch,
            t.len,
            t.rank,
            t.tokens_per_s.unwrap_or(0.0),
            t.peak.unwrap_or(0) as f64 / GB
        ),
        _ => println!("\nNo configuration ran successfully under the {budget_gb:.1} GB budget."),
    }
    if let Some(t) = best {
        let path = crate::runtime::setup_file::record_best(
            &a.model.model,
            crate::runtime::setup_file::Best {
                batch_size: t.batch,
                max_seq_length: t.len,
                lora_rank: t.rank,
                tokens_per_s: t.tokens_per_s.unwrap_or(0.0),
                peak_bytes: t.peak.unwrap_or(0),
                budget_bytes: budget.bytes,
                quantize: t.quant,
            },
        )?;
        eprintln!(
            "saved as the best configuration of {} in {} (train --auto-optimize uses it)",
            a.model.model,
            path.display()
        );
    }
    if let Some(path) = &a.output {
        let report = json!({
            "model": a.model.model,
            "device": format!("{device:?}"),
            "dtype": format!("{dtype:?}"),
            "memory_budget_bytes": budget.bytes,
            "device_memory_bytes": budget.total,
            "steps": a.steps,
            "configurations": trials.iter().map(Trial::json).collect::<Vec<_>>(),
            "recommended": best.map(|t| { let mut j = t.json(); j["command"] = json!(command); j }),
        });
        crate::io::write_file(
            path,
            serde_json::to_string_pretty(&report)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}
