//! `your_ai train`: checks every flag and every data line before anything is written, then
//! loads the model, attaches a fresh LoRA adapter and runs the trainer.

use crate::cli::TrainArgs;
use crate::data::{read_jsonl, resolve_files, DataError, Encoder, Record, Sample};
use crate::error::{Error, Result};
use crate::model::lora::{Adapter, LoraConfig, Target};
use crate::model::Inspected;
use crate::runtime::device::{select_device, select_dtype};
use crate::runtime::memory::{self, budget, budget::Budget};
use crate::train::checkpoint;
use crate::train::config::{KeepActivations, TrainConfig};
use crate::train::estimate::{estimate, largest_batch, suggestions, Estimate, Workload};
use crate::train::trainer::{self, Datasets};
use std::path::{Path, PathBuf};

fn usage(msg: String) -> Error {
    Error::Usage(msg)
}

/// What the pre-flight decided: the budget, and the settings that fit it.
struct Preflight {
    budget: Budget,
    batch_size: usize,
    keep_blocks: usize,
    estimate: Estimate,
}

/// Sets the budget, prints the memory estimate and refuses (or, with `--auto-fit`, shrinks the
/// batch of) a run that would not fit — before any weight is read.
fn preflight(
    a: &TrainArgs,
    targets: &[Target],
    inspected: &Inspected,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<Preflight> {
    let mem = budget::device_memory(device);
    let budget = budget::resolve(a.max_memory, mem.total).map_err(usage)?;
    for line in budget.describe() {
        eprintln!("{line}");
    }
    let cfg = &inspected.cfg;
    let adapted = a.num_layers.unwrap_or(cfg.num_hidden_layers);
    let mut w = Workload {
        batch_size: a.batch_size,
        seq_len: a.max_seq_length,
        lora_rank: a.lora_rank,
        targets: targets.to_vec(),
        adapted_layers: adapted.min(cfg.num_hidden_layers),
        keep_blocks: 0,
        dropout: a.lora_dropout > 0.0,
        packed: a.pack,
        act_bytes: dtype.size_in_bytes(),
        weights: super::weight_format(
            inspected,
            super::quant_flag(a.quantize)?,
            dtype.size_in_bytes(),
        ),
        source_bytes: inspected.weight_file_bytes,
        cpu_kernels: device.is_cpu()
            && dtype == candle_core::DType::F32
            && crate::kernels::enabled(),
    };
    let fits = |w: &Workload| estimate(cfg, w).peak() <= budget.bytes;
    if !fits(&w) {
        let e = estimate(cfg, &w);
        let over = e.peak() - budget.bytes;
        match (
            a.auto_fit,
            largest_batch(cfg, &w, a.batch_size, budget.bytes),
        ) {
            (true, Some(b)) => {
                eprintln!(
                    "--auto-fit: batch size {} would need {:.2} GB; training with batch size {b}, which fits",
                    a.batch_size,
                    e.peak() as f64 / 1e9
                );
                w.batch_size = b;
            }
            _ => {
                eprint!("{}", e.table(Some(budget.bytes)));
                let advice = suggestions(cfg, &w, budget.bytes, true);
                let advice = if advice.is_empty() {
                    "nothing smaller fits either; this model needs a machine with more memory"
                        .into()
                } else {
                    format!("any one of these fits: {}", advice.join(", "))
                };
                return Err(usage(format!(
                    "--max-memory: the estimated peak, {:.2} GB, is {:.2} GB over the {:.2} GB budget; {advice}{}",
                    e.peak() as f64 / 1e9,
                    over as f64 / 1e9,
                    budget.bytes as f64 / 1e9,
                    if a.auto_fit { "" } else { " (or pass --auto-fit to pick the batch size)" }
                )));
            }
        }
    }
    // Kept activations only where the budget has room, with a tenth of it spare.
    let room = budget.bytes / 10 * 9;
    let keep_fits = |k: usize| {
        estimate(
            cfg,
            &Workload {
                keep_blocks: k,
                ..w.clone()
            },
        )
        .peak()
            <= room
    };
    let keep_blocks = match a.keep_activations {
        KeepActivations::None => 0,
        KeepActivations::All => w.adapted_layers,
        KeepActivations::Blocks(n) => n.min(w.adapted_layers),
        KeepActivations::Auto => (0..=w.adapted_layers)
            .rev()
            .find(|&k| keep_fits(k))
            .unwrap_or(0),
    };
    w.keep_blocks = keep_blocks;
    let e = estimate(cfg, &w);
    eprint!("{}", e.table(Some(budget.bytes)));
    if e.peak() > budget.bytes {
        return Err(usage(format!(
            "--keep-activations: keeping {keep_blocks} blocks' activations needs {:.2} GB, over the {:.2} GB budget; use --keep-activations auto or none",
            e.peak() as f64 / 1e9,
            budget.bytes as f64 / 1e9
        )));
    }
    Ok(Preflight {
        budget,
        batch_size: w.batch_size,
        keep_blocks,
        estimate: e,
    })
}

fn check_flags(a: &TrainArgs) -> Result<Vec<Target>> {
    if a.reload_interval == Some(0) {
        return Err(usage(
            "--reload-interval 0: give a number of steps (at least 1), or leave the flag out"
                .into(),
        ));
    }
    let positive = [
        (a.batch_size, "--batch-size"),
        (a.grad_accumulation_steps, "--grad-accumulation-steps"),
        (a.lora_rank, "--lora-rank"),
    ];
    for (v, flag) in positive {
        if v == 0 {
            return Err(usage(format!("{flag} 0: it must be at least 1")));
        }
    }
    if a.epochs.is_none() && a.max_steps == 0 {
        return Err(usage("--max-steps 0: train for at least one step".into()));
    }
    if let Some(e) = a.epochs {
        if !(e.is_finite() && e > 0.0) {
            return Err(usage(format!("--epochs {e}: it must be a positive number")));
        }
    }
    if a.max_seq_length < 2 {
        return Err(usage("--max-seq-length must be at least 2".into()));
    }
    if !(a.learning_rate.is_finite() && a.learning_rate > 0.0) {
        return Err(usage(format!(
            "--learning-rate {}: it must be a positive number",
            a.learning_rate
        )));
    }
    for (v, flag) in [
        (a.min_lr, "--min-lr"),
        (a.weight_decay, "--weight-decay"),
        (a.max_grad_norm, "--max-grad-norm"),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(usage(format!("{flag} {v}: it must be zero or positive")));
        }
    }
    if let Some(alpha) = a.lora_alpha {
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(usage(format!(
                "--lora-alpha {alpha}: it must be a positive number"
            )));
        }
    }
    if !(0.0..1.0).contains(&a.lora_dropout) {
        return Err(usage(format!(
            "--lora-dropout {}: it must be at least 0 and below 1",
            a.lora_dropout
        )));
    }
    if a.num_layers == Some(0) {
        return Err(usage("--num-layers 0: adapt at least one block".into()));
    }
    parse_targets(&a.lora_targets)
}

/// `--lora-targets` as layer kinds, sorted and without repeats.
pub(crate) fn parse_targets(names: &[String]) -> Result<Vec<Target>> {
    let mut targets = vec![];
    for t in names {
        let t = Target::parse(t).ok_or_else(|| {
            usage(format!(
                "--lora-targets: `{t}` is not one of q, k, v, o, gate, up, down"
            ))
        })?;
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    if targets.is_empty() {
        return Err(usage("--lora-targets: name at least one layer".into()));
    }
    targets.sort();
    Ok(targets)
}

/// Reads a JSONL file or reports that none was given.
fn read_optional(path: Option<&PathBuf>) -> Result<Vec<Record>> {
    match path {
        Some(p) => Ok(read_jsonl(p)?),
        None => Ok(vec![]),
    }
}

/// Encodes every record, collecting all failures with their file:line.
fn encode_all(encoder: &Encoder, records: &[Record]) -> Result<Vec<Sample>> {
    let mut out = Vec::with_capacity(records.len());
    let mut errors = vec![];
    for r in records {
        match encoder.encode(r) {
            Ok(s) => out.push(s),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        return Err(DataError::invalid(errors).into());
    }
    Ok(out)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let targets = check_flags(&a)?;
    let files = resolve_files(&a.data)?;
    let train_records = read_jsonl(&files.train)?;
    let distrust = crate::distrust::formula::resolve(
        a.distrust,
        a.no_distrust,
        a.alpha,
        a.lambda_weight,
        &train_records,
    )?;
    let valid_records = read_optional(files.valid.as_ref())?;
    let test_records = if a.test {
        read_optional(files.test.as_ref())?
    } else {
        vec![]
    };
    if a.test && files.test.is_none() {
        return Err(usage(format!(
            "--test: {} has no test.jsonl",
            a.data.display()
        )));
    }

    let inspected = crate::model::inspect(&a.model.model)?;
    let device = select_device(a.model.device)?;
    // On a CUDA GPU the budget is GPU memory, and so is what the step measures against it.
    let meter = memory::Meter::new(&device);
    let dtype = select_dtype(a.model.dtype, &device);
    let plan = preflight(&a, &targets, &inspected, &device, dtype)?;
    let mut a = a;
    a.batch_size = plan.batch_size;
    let quant = super::quant_flag(a.quantize)?;
    let (model, tokenizer) =
        crate::model::load::load_source_with(&inspected.source, &device, dtype, quant)?;
    let mut loaded = crate::model::LoadedModel {
        model,
        tokenizer,
        name: crate::model::load::model_name(&a.model.model, &inspected.source),
        source: inspected.source.clone(),
        load_time: Default::default(),
    };
    // The load's peak is behind us; from here the peak measured is training's.
    let loaded_reading = meter.read();
    let load_peak = loaded_reading.peak();
    let load_peak_rss = loaded_reading.rss_peak;
    meter.reset_peak();
    let model_cfg = loaded.model.cfg.clone();
    let layers = model_cfg.num_hidden_layers;
    let num_layers = a.num_layers.unwrap_or(layers);
    if num_layers > layers {
        return Err(usage(format!(
            "--num-layers {num_layers}: the model has only {layers} blocks"
        )));
    }
    let mask_prompt = !a.no_mask_prompt;
    let encoder = Encoder::new(&loaded.tokenizer, mask_prompt, a.max_seq_length)?;
    let train = encode_all(&encoder, &train_records)?;
    let valid = encode_all(&encoder, &valid_records)?;
    let test = encode_all(&encoder, &test_records)?;
    let truncated = train
        .iter()
        .chain(&valid)
        .chain(&test)
        .filter(|s| s.truncated > 0)
        .count();
    if truncated > 0 {
        eprintln!(
            "warning: {truncated} example(s) longer than --max-seq-length {} were truncated",
            a.max_seq_length
        );
    }
    let total_tokens: usize = train.iter().map(|s| s.ids.len()).sum();
    let trained_tokens: usize = train.iter().map(Sample::trained_count).sum();
    if trained_tokens == 0 {
        return Err(usage(format!(
            "{}: no token of the training data is trained (every example is prompt only after masking{}); \
             check the data, or pass --no-mask-prompt to train on every token",
            files.train.display(),
            if truncated > 0 { " or truncation" } else { "" }
        )));
    }
    let weights = distrust
        .as_ref()
        .map(|(d, prov)| crate::distrust::formula::example_weights(prov, d.alpha, d.lambda));
    let rows = trainer::weighted_rows(&train, weights.as_ref(), a.pack, a.max_seq_length);
    if a.batch_size > rows.len() {
        return Err(usage(format!(
            "--batch-size {} is larger than the training set ({} {}); use at most {}",
            a.batch_size,
            rows.len(),
            if a.pack { "packed rows" } else { "examples" },
            rows.len()
        )));
    }
    let batches_per_epoch = rows.len() / a.batch_size;
    let steps = match a.epochs {
        Some(e) => ((e * batches_per_epoch as f64) / a.grad_accumulation_steps as f64)
            .ceil()
            .max(1.0) as usize,
        None => a.max_steps,
    };
    let warmup = a.warmup_steps.min(steps);
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| Path::new("models").join(format!("{}-lora", loaded.name)));
    let cfg = TrainConfig {
        model: a.model.model.clone(),
        data: a.data.clone(),
        metrics_file: a
            .metrics_file
            .clone()
            .unwrap_or_else(|| output.join("metrics.jsonl")),
        output,
        batch_size: a.batch_size,
        steps,
        epochs: a.epochs,
        max_seq_length: a.max_seq_length,
        grad_accumulation_steps: a.grad_accumulation_steps,
        learning_rate: a.learning_rate,
        lr_schedule: a.lr_schedule,
        warmup_steps: warmup,
        min_lr: a.min_lr,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        lora_rank: a.lora_rank,
        lora_alpha: a.lora_alpha.unwrap_or(2.0 * a.lora_rank as f64),
        lora_dropout: a.lora_dropout,
        lora_targets: targets.clone(),
        num_layers,
        mask_prompt,
        pack: a.pack,
        steps_per_eval: a.steps_per_eval,
        val_batches: a.val_batches,
        save_every: a.save_every,
        keep_checkpoints: a.keep_checkpoints,
        test: a.test,
        save_best: !a.no_save_best,
        memory_report_interval: a.memory_report_interval,
        profile: a.profile,
        keep_activations: a.keep_activations,
        keep_blocks: plan.keep_blocks,
        memory_budget: plan.budget.bytes,
        reload_interval: a.reload_interval,
        distrust: distrust.as_ref().map(|d| d.0),
        quantize: a.quantize,
    };

    let mut data_files: Vec<&Path> = vec![&files.train];
    data_files.extend(files.valid.as_deref());
    let data_sha256 = checkpoint::data_fingerprint(&data_files)?;
    let resume = match &a.resume {
        Some(given) => {
            let dir = checkpoint::locate(&cfg.output, given)?;
            let loaded = checkpoint::load(&dir, &loaded.model.device)?;
            let (mut refused, allowed) = checkpoint::differences(&loaded.state.config, &cfg);
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
            eprintln!(
                "resuming from {} (step {} of {})",
                dir.display(),
                loaded.state.step,
                cfg.steps
            );
            Some(loaded)
        }
        None => None,
    };
    let adapter = match &resume {
        Some(r) => Adapter::load_peft(&r.dir, &model_cfg, &loaded.model.device)?,
        None => {
            let lora = LoraConfig {
                rank: cfg.lora_rank,
                alpha: cfg.lora_alpha,
                dropout: cfg.lora_dropout,
                targets,
                layers: (layers - num_layers..layers).collect(),
                use_rslora: false,
            };
            Adapter::init(lora, &model_cfg, cfg.seed, &loaded.model.device)?
        }
    };
    eprintln!(
        "model: {} ({} blocks, hidden {}), LoRA rank {} alpha {} on {} of the last {} blocks: {} trainable parameters",
        loaded.name,
        layers,
        model_cfg.hidden_size,
        cfg.lora_rank,
        cfg.lora_alpha,
        cfg.lora_targets.iter().map(|t| t.module()).collect::<Vec<_>>().join(","),
        num_layers,
        adapter.num_params()
    );
    eprintln!(
        "data: {} training examples, {} validation, {} test; {} of {} training tokens trained ({:.1}%)",
        train.len(),
        valid.len(),
        test.len(),
        trained_tokens,
        total_tokens,
        100.0 * trained_tokens as f64 / total_tokens.max(1) as f64
    );
    if let (Some(s), Some(w)) = (&cfg.distrust, &weights) {
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
    if warmup < a.warmup_steps {
        eprintln!(
            "note: --warmup-steps {} capped at the run's {} steps",
            a.warmup_steps, steps
        );
    }
    eprintln!(
        "training: {} steps of {} × {} example(s), lr {} ({:?}, warmup {}), output {}",
        steps,
        cfg.grad_accumulation_steps,
        cfg.batch_size,
        cfg.learning_rate,
        cfg.lr_schedule,
        warmup,
        cfg.output.display()
    );
    std::fs::create_dir_all(&cfg.output).map_err(|e| Error::io("create", &cfg.output, e))?;
    loaded.model.adapter = Some(adapter);
    crate::runtime::signals::install();
    let data = Datasets {
        train,
        valid,
        test,
        weights,
    };
    if let Some(p) = load_peak {
        eprintln!(
            "model loaded: peak {} {:.2} GB",
            meter.measure().name(),
            memory::gb(p)
        );
    }
    let source = inspected.source;
    let reload = move || -> Result<crate::model::Llama> {
        Ok(crate::model::load::load_source(&source, &device, dtype)?.0)
    };
    let mut start = serde_json::json!({
        "memory_budget_bytes": plan.budget.bytes,
        "device_memory_bytes": plan.budget.total,
        "estimate_peak_bytes": plan.estimate.peak(),
        "estimate_train_peak_bytes": plan.estimate.train_peak,
        "estimate_load_peak_bytes": plan.estimate.load_peak,
        "load_peak_rss_bytes": load_peak_rss,
        "batch_size": cfg.batch_size,
        "max_seq_length": cfg.max_seq_length,
        "lora_rank": cfg.lora_rank,
    });
    if meter.measure() == memory::Measure::Gpu {
        // Beside the resident figure, as the step and end records have theirs.
        start["load_peak_gpu_bytes"] = serde_json::json!(load_peak);
    }
    let summary = trainer::train(
        &cfg,
        loaded.model,
        &data,
        &data_sha256,
        resume,
        &reload,
        start,
        &meter,
    )?;
    summary.print();
    Ok(())
}
