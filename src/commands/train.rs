//! `your_ai train`: checks every flag and every data line before anything is written, runs the
//! pre-flight (budget and estimate), encodes the data and resolves the configuration (a
//! resumed run checked against its checkpoint) with the model's tokenizer alone, then loads
//! the model once and runs the trainer over the engine `--engine` chose (candle, or MLX in a
//! binary built with it).

use crate::cli::TrainArgs;
use crate::data::batch::weighted_rows;
use crate::data::files::resolve_files;
use crate::data::Sample;
use crate::engine::candle::CandleEngine;
use crate::engine::choice::{self, EngineChoice};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::io::DirLock;
use crate::model::{Identity, LoadedModel, ModelConfig};
use crate::runtime::memory::{self, Meter};
use crate::runtime::{setup_file, signals};
use crate::train::checkpoint;
use crate::train::config::{DistrustSettings, TrainConfig};
use crate::train::plan::{preflight, Plan};
use crate::train::trainer::{initial_adapter, Datasets, Trainer};
use std::path::{Path, PathBuf};

mod data;
mod output;
use data::{check_preference_flags, encode, encode_pairs, read_pairs, read_records};
use output::{claim_output, finished, held_in, not_empty, Resuming};

fn usage(msg: String) -> Error {
    Error::Usage(msg)
}

pub fn run(mut a: TrainArgs) -> Result<()> {
    let auto_tokens = if a.auto_optimize {
        auto_optimize(&mut a)?
    } else {
        None
    };
    a.batch.check()?;
    a.objective.check()?;
    a.schedule.check()?;
    a.lora.check()?;
    a.output.check()?;
    if a.resume.is_some() && a.output.force {
        return Err(usage(
            "--resume continues the run in --output and --force replaces it: give one".into(),
        ));
    }
    a.memory.check()?;
    let files = resolve_files(&a.data.data)?;
    let method = a.objective.method;
    if method.is_preference() {
        check_preference_flags(&a)?;
    }
    let pair_rows = read_pairs(&a, &files)?;
    let records = match pair_rows {
        Some(_) => Default::default(),
        None => read_records(&a, &files)?,
    };
    let distrust = crate::distrust::formula::resolve(
        a.distrust.distrust,
        a.distrust.no_distrust,
        a.distrust.alpha,
        a.distrust.lambda_weight,
        &records.0,
    )?;

    // The output's plain refusals before what can be minutes of loading (claim_output decides
    // once the run is resolved).
    if let Some(dir) = &a.output.output {
        DirLock::refuse_a_file(dir, "--output")?;
        if a.resume.is_none() && !a.output.force {
            let held = held_in(dir)?;
            if !held.is_empty() {
                return Err(not_empty(dir, held));
            }
        }
    }

    let inspected = crate::model::inspect(&a.model.model)?;
    let context = inspected.cfg.max_position_embeddings;
    a.batch
        .fit_context(context, a.given.contains("max_seq_length"))?;
    if let Some(tokens) = auto_tokens {
        // As many tokens a micro-batch as the benchmark's fastest, at this run's length; a
        // preference pair is two rows.
        let rows = if method.is_preference() { 2 } else { 1 };
        a.batch.batch_size = (tokens / (rows * a.batch.max_seq_length)).max(1);
        eprintln!(
            "--auto-optimize: batch {} at --max-seq-length {}",
            a.batch.batch_size, a.batch.max_seq_length
        );
    }
    let engine = choice::resolve(a.engine, a.model.device)?;
    let load = match engine {
        EngineChoice::Candle => a
            .model
            .kernel_load_options(a.quantize.quantize, inspected.matrix_dtype)?,
        EngineChoice::Mlx => choice::mlx_load_options(&a.model, a.quantize.quantize)?,
    };
    // Resident memory; the MLX engine measures with its own meter.
    let meter = Meter::resident();
    // A preference micro-batch of B pairs is 2·B rows: the step's memory is that of 2·B rows.
    let rows_per_unit = if method.is_preference() { 2 } else { 1 };
    let mut rows = a.batch.clone();
    rows.batch_size *= rows_per_unit;
    let plan = preflight(
        &inspected,
        &load,
        &rows,
        &a.lora,
        &a.memory,
        a.schedule.pack,
        engine,
    )?;
    a.batch.batch_size = plan.batch_size / rows_per_unit;
    if a.batch.batch_size == 0 {
        return Err(usage(format!(
            "--max-memory: one preference pair (two rows of --max-seq-length {}) does not fit the \
             budget; lower --max-seq-length or raise --max-memory",
            a.batch.max_seq_length
        )));
    }
    // Data and the resumed checkpoint are checked before the weights are read: a data error,
    // a resume that differs from its run, or one already finished is told at once, not after
    // the minutes a large model's load takes.
    let id = crate::model::identify(&a.model.model)?;
    let data = match pair_rows {
        Some(rows) => encode_pairs(&a, &id.tokenizer, rows)?,
        None => encode(
            &a,
            &id.tokenizer,
            records,
            distrust.as_ref().map(|d| &d.1),
            &files,
        )?,
    };
    let resume_given = a.resume.clone();
    a.engine = Some(engine);
    let cfg = resolve(a, &inspected.cfg, &id, &data, &plan, distrust.map(|d| d.0))?;
    drop(id);
    let mut data_files: Vec<&Path> = vec![&files.train];
    data_files.extend(files.valid.as_deref());
    let data_sha256 = checkpoint::data_fingerprint(&data_files)?;
    let resume = match &resume_given {
        Some(given) => resume_from(&cfg, given, &data_sha256)?,
        None => None,
    };
    // Held until the run ends: no second run writes into the same directory.
    let resuming = match (&resume_given, &resume) {
        (_, Some(r)) => Resuming::Checkpoint {
            metrics: r.state.config["metrics_file"].as_str().map(PathBuf::from),
            at: r.dir.clone(),
            step: r.state.step,
        },
        (Some(_), None) => Resuming::NoCheckpoint,
        (None, None) => Resuming::No,
    };
    let claim = claim_output(&cfg, &resuming)?;
    if let Some(r) = &resume {
        if finished(&cfg, r.state.step) {
            // Nothing is written: a retry loop around `--resume` ends here (exit 0) instead
            // of evaluating the finished adapter again and appending records to its metrics.
            eprintln!(
                "note: --resume: the run in {} already finished (step {} of {}); nothing to do. \
                 Raise --max-steps to train further",
                cfg.output_dir().display(),
                r.state.step,
                cfg.steps
            );
            return Ok(());
        }
    }

    // What came before (the data) is not the load's: its peak is measured from here.
    meter.reset_peak();
    let loaded = crate::model::load(&cfg.model.model, &load, None)?;
    // The load's peak is behind us; from here the peak measured is training's.
    let load_reading = meter.read();
    meter.reset_peak();
    let adapter = initial_adapter(&cfg, &loaded.model.cfg, resume.as_ref())?;
    claim.replace_earlier()?;
    if let Some(r) = &resume {
        eprintln!(
            "resuming from {} (step {} of {})",
            r.dir.display(),
            r.state.step,
            cfg.steps
        );
    }
    describe(&cfg, &loaded, &adapter, &data);
    signals::install();
    if let Some(p) = load_reading.peak() {
        eprintln!(
            "model loaded: peak {} {:.2} GB",
            meter.measure().name(),
            memory::gb(p)
        );
    }
    // Completed by the MLX branch with the conversion's peak.
    #[cfg_attr(not(feature = "mlx"), allow(unused_mut))]
    let mut start = serde_json::json!({
        // First: a metrics file is known by how its first line opens (output.rs).
        "memory_budget_bytes": plan.budget.bytes,
        "device_memory_bytes": plan.budget.total,
        "estimate_peak_bytes": plan.estimate.peak(),
        "estimate_train_peak_bytes": plan.estimate.train_peak,
        "estimate_load_peak_bytes": plan.estimate.load_peak,
        "load_peak_rss_bytes": load_reading.rss_peak,
        "batch_size": cfg.batch.batch_size,
        "max_seq_length": cfg.batch.max_seq_length,
        "lora_rank": cfg.lora.lora_rank,
    });
    match engine {
        EngineChoice::Candle => train_on(
            CandleEngine::new(
                loaded.model,
                &cfg.model.model,
                load,
                cfg.schedule.weight_decay,
                cfg.keep_blocks,
                meter,
            ),
            (&cfg, &data, &data_sha256),
            adapter,
            resume,
            start,
        ),
        #[cfg(feature = "mlx")]
        EngineChoice::Mlx => {
            let engine = crate::engine::mlx::MlxEngine::new(
                loaded.model,
                &cfg.model.model,
                load,
                (cfg.schedule.weight_decay, cfg.keep_blocks),
                plan.budget.bytes,
                Some(plan.estimate.cache),
            )?;
            // The conversion to MLX arrays ends the load: its peak, in MLX's measure and
            // resident memory, before training's is measured.
            let converted = engine.meter().read();
            start["load_peak_mlx_bytes"] = serde_json::json!(converted.mlx_phase_peak);
            start["load_peak_rss_bytes"] =
                serde_json::json!(converted.rss_phase_peak.max(load_reading.rss_peak));
            engine.meter().reset_peak();
            train_on(engine, (&cfg, &data, &data_sha256), adapter, resume, start)
        }
        #[cfg(not(feature = "mlx"))]
        EngineChoice::Mlx => Err(usage(
            "--engine mlx: this binary was built without the MLX engine".into(),
        )),
    }
}

/// The trainer over `engine`, run to the end, its summary printed.
fn train_on<E: Engine>(
    engine: E,
    (cfg, data, data_sha256): (&TrainConfig, &Datasets, &str),
    adapter: crate::model::lora::Adapter,
    resume: Option<checkpoint::Loaded>,
    start: serde_json::Value,
) -> Result<()> {
    Trainer::new(cfg, engine, data, data_sha256, adapter, resume, start)?
        .run()?
        .print();
    Ok(())
}

/// `--auto-optimize`: the best configuration `benchmark` saved for this model (measured first
/// when there is none) fills the quantization that neither the command line nor the config
/// file gave, and returns the tokens per micro-batch to size an open `--batch-size` from.
fn auto_optimize(a: &mut TrainArgs) -> Result<Option<usize>> {
    let model = &a.model.model;
    let key = setup_file::model_key(model);
    let saved = setup_file::load()?.and_then(|p| p.best.get(&key).cloned());
    // A saved best measured at a peak over the budget given now would be refused: measure
    // again under this one.
    let budget = a.memory.budget.max_memory.map(|gb| (gb * 1e9) as u64);
    let saved = saved.filter(|b| budget.is_none_or(|limit| b.peak_bytes <= limit));
    let best = match saved {
        Some(b) => b,
        None => {
            eprintln!(
                "--auto-optimize: no benchmark of {model} saved yet{}; running `your_ai benchmark --quick` first",
                if budget.is_some() { " within --max-memory" } else { "" }
            );
            // The benchmark measures what this run will be: its device, dtype, engine, base
            // precision and budget.
            let mut args: Vec<String> = vec![
                "benchmark".into(),
                "--quick".into(),
                "--model".into(),
                model.clone(),
                "--device".into(),
                crate::cli::flag_name(a.model.device),
                "--dtype".into(),
                crate::cli::flag_name(a.model.dtype),
            ];
            if let Some(gb) = a.memory.budget.max_memory {
                args.extend(["--max-memory".into(), gb.to_string()]);
            }
            if let Some(e) = a.engine {
                args.extend(["--engine".into(), crate::cli::flag_name(e)]);
            }
            if let Some(q) = a.quantize.quantize {
                args.extend(["--quantize".into(), q.bits().to_string()]);
            }
            let exe = std::env::current_exe().map_err(|e| Error::io("find", "your_ai", e))?;
            let status = std::process::Command::new(exe)
                .args(&args)
                .status()
                .map_err(|e| Error::io("run", "your_ai benchmark", e))?;
            let found = setup_file::load()?
                .and_then(|p| p.best.get(&key).cloned())
                .filter(|b| budget.is_none_or(|limit| b.peak_bytes <= limit));
            match (status.success(), found) {
                (true, Some(b)) => b,
                _ => {
                    return Err(usage(format!(
                    "--auto-optimize: the benchmark found no configuration of {model} that fits; \
                         train without --auto-optimize, or with a larger --max-memory"
                )))
                }
            }
        }
    };
    eprintln!(
        "--auto-optimize: the benchmark's fastest was batch {} × length {}{} ({:.1} tokens/s); \
         flags on the command line win",
        best.batch_size,
        best.max_seq_length,
        best.quantize
            .map_or(String::new(), |q| format!(", --quantize {q}")),
        best.tokens_per_s
    );
    let open = |name: &str| !a.given.contains(name);
    if open("quantize") {
        a.quantize.quantize = best
            .quantize
            .and_then(crate::model::quantized::QuantBits::parse);
    }
    // The length and the rank are the run's: one cuts examples, the other sets what the
    // adapter can learn. Only the micro-batch follows the benchmark, sized once the run's
    // length is known.
    Ok(open("batch_size").then_some(best.batch_size * best.max_seq_length))
}

/// The run's configuration: the flag groups, with what their defaults left open resolved
/// against the model and the data, and the pre-flight's decisions.
fn resolve(
    mut a: TrainArgs,
    model: &ModelConfig,
    id: &Identity,
    data: &Datasets,
    plan: &Plan,
    distrust: Option<DistrustSettings>,
) -> Result<TrainConfig> {
    let layers = model.num_hidden_layers;
    let num_layers = a.lora.num_layers.unwrap_or(layers);
    if num_layers > layers {
        return Err(usage(format!(
            "--num-layers {num_layers}: the model has only {layers} blocks"
        )));
    }
    let units = match &data.pairs {
        Some(p) => p.train.len(),
        None => weighted_rows(
            &data.train,
            data.weights.as_ref(),
            a.schedule.pack,
            a.batch.max_seq_length,
        )
        .len(),
    };
    if a.batch.batch_size > units {
        return Err(usage(format!(
            "--batch-size {} is larger than the training set ({units} {}); use at most {units}",
            a.batch.batch_size,
            if data.pairs.is_some() {
                "pairs"
            } else if a.schedule.pack {
                "packed rows"
            } else {
                "examples"
            },
        )));
    }
    let batches_per_epoch = units / a.batch.batch_size;
    if a.schedule.grad_accumulation_steps > batches_per_epoch {
        eprintln!(
            "warning: --grad-accumulation-steps {} is more than an epoch's {batches_per_epoch} \
             batches: each step sees some examples more than once",
            a.schedule.grad_accumulation_steps
        );
    }
    let steps = match a.schedule.epochs {
        Some(e) => ((e * batches_per_epoch as f64) / a.schedule.grad_accumulation_steps as f64)
            .ceil()
            .max(1.0) as usize,
        None => a.schedule.max_steps,
    };
    // The schedule caps the warmup at the run's steps; the setting stays as given, so that a
    // run extended with --resume --max-steps N warms up as the longer run would.
    if a.schedule.warmup_steps > steps {
        eprintln!(
            "note: --warmup-steps {} capped at the run's {steps} steps",
            a.schedule.warmup_steps
        );
    }
    a.lora.lora_alpha = Some(a.lora.alpha());
    a.lora.lora_targets = a.lora.targets();
    a.lora.num_layers = Some(num_layers);
    let output = a
        .output
        .output
        .clone()
        .unwrap_or_else(|| Path::new("models").join(format!("{}-lora", id.name)));
    a.output.metrics_file = Some(
        a.output
            .metrics_file
            .clone()
            .unwrap_or_else(|| output.join("metrics.jsonl")),
    );
    a.output.output = Some(output);
    Ok(TrainConfig {
        model: a.model,
        quantize: a.quantize,
        data: a.data,
        batch: a.batch,
        objective: a.objective,
        schedule: a.schedule,
        lora: a.lora,
        output: a.output,
        memory: a.memory,
        steps,
        keep_blocks: plan.keep_blocks,
        memory_budget: plan.budget.bytes,
        distrust,
        engine: a.engine,
        weights_dtype: Some(plan.weights_dtype.as_str().to_string()),
        model_fingerprint: Some(checkpoint::model_fingerprint(&id.source)?),
    })
}

/// The checkpoint `--resume` names, read and checked against this run's configuration; None
/// when the output has no checkpoint yet (the run starts from the beginning).
fn resume_from(
    cfg: &TrainConfig,
    given: &str,
    data_sha256: &str,
) -> Result<Option<checkpoint::Loaded>> {
    let Some(dir) = checkpoint::locate(cfg.output_dir(), given)? else {
        eprintln!(
            "note: --resume: {} has no checkpoint yet; starting from the beginning",
            cfg.output_dir().join("checkpoints").display()
        );
        return Ok(None);
    };
    let loaded = checkpoint::load(&dir)?;
    let (mut refused, allowed) = checkpoint::differences(&loaded.state.config, cfg);
    if loaded.state.data_sha256 != data_sha256 {
        refused.push("training data: the content changed since the checkpoint".into());
    }
    if !refused.is_empty() {
        return Err(usage(format!(
            "--resume {}: this run differs from the checkpoint's in ways that change what is trained:\n  {}\n\
             Use the original settings, or start a new run in another --output",
            dir.display(),
            refused.join("\n  ")
        )));
    }
    for change in &allowed {
        eprintln!("note: resuming with a changed setting: {change}");
    }
    // A checkpoint of the last step: the run was stopped after it but before the final
    // adapter was written; resuming finishes that (the final evaluation and adapter).
    if loaded.state.step > cfg.steps {
        return Err(usage(format!(
            "--resume {}: the checkpoint is at step {}, the run has {} steps; raise --max-steps to train further",
            dir.display(),
            loaded.state.step,
            cfg.steps
        )));
    }
    Ok(Some(loaded))
}

/// The run in a few lines: model and adapter, data, distrust weighting, schedule.
fn describe(
    cfg: &TrainConfig,
    loaded: &LoadedModel,
    adapter: &crate::model::lora::Adapter,
    data: &Datasets,
) {
    let m = &loaded.model.cfg;
    eprintln!(
        "model: {} ({} blocks, hidden {}), LoRA rank {} alpha {} on {} of the last {} blocks: {} trainable parameters",
        loaded.name,
        m.num_hidden_layers,
        m.hidden_size,
        cfg.lora.lora_rank,
        cfg.lora.alpha(),
        cfg.lora.targets().iter().map(|t| t.module()).collect::<Vec<_>>().join(","),
        cfg.num_layers(),
        adapter.num_params()
    );
    if let Some(p) = &data.pairs {
        let answers: usize = p
            .train
            .iter()
            .map(|p| p.chosen.trained_count() + p.rejected.trained_count())
            .sum();
        eprintln!(
            "data: {} training pairs, {} validation, {} test; {answers} answer tokens scored; \
             {} with beta {}",
            p.train.len(),
            p.valid.len(),
            p.test.len(),
            cfg.objective.method.name(),
            cfg.objective.beta
        );
    }
    let total: usize = data.train.iter().map(|s| s.ids.len()).sum();
    let trained: usize = data.train.iter().map(Sample::trained_count).sum();
    if data.pairs.is_none() {
        eprintln!(
            "data: {} training examples, {} validation, {} test; {} of {} training tokens trained ({:.1}%)",
            data.train.len(),
            data.valid.len(),
            data.test.len(),
            trained,
            total,
            100.0 * trained as f64 / total.max(1) as f64
        );
    }
    if let (Some(s), Some(w)) = (&cfg.distrust, &data.weights) {
        let (lo, hi) =
            w.c.iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &c| (l.min(c), h.max(c)));
        eprintln!(
            "distrust: alpha {}, lambda {}: mean D {:.3} over {} examples, example weights {lo:.3}..{hi:.3} (the loss is Σ c·CE / Σ c·tokens; D itself is never added)",
            s.alpha,
            s.lambda,
            w.d_mean,
            w.d.len()
        );
    }
    let s = &cfg.schedule;
    eprintln!(
        "training: {} steps of {} × {} example(s), lr {} ({:?}, warmup {}), output {}",
        cfg.steps,
        s.grad_accumulation_steps,
        cfg.batch.batch_size,
        s.learning_rate,
        s.lr_schedule,
        s.warmup_steps.min(cfg.steps),
        cfg.output_dir().display()
    );
}
