//! The training loop: micro-batches → block-wise step → clipping → AdamW, with evaluation,
//! saving, metrics and the progress line.

use crate::data::batch::{pack_with_d, Batcher, ExampleWeights, Row};
use crate::data::Sample;
use crate::engine::candle::batch::micro_batch;
use crate::engine::candle::optimizer::{clip_grad_norm, AdamW};
use crate::engine::candle::step::{Grads, LossSums, Profile, Step};
use crate::error::{Error, Result};
use crate::infer::eval::evaluate;
use crate::io::Staged;
use crate::model::lora::Adapter;
use crate::model::Llama;
use crate::runtime::memory;
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::progress::{Progress, StepReport};
use crate::train::schedule::Schedule;
use serde_json::json;
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Consecutive non-finite steps after which the run stops.
const MAX_NONFINITE: usize = 3;

pub struct Datasets {
    pub train: Vec<Sample>,
    pub valid: Vec<Sample>,
    pub test: Vec<Sample>,
    /// Distrust weights of the training examples (`train --distrust`); None for plain training.
    pub weights: Option<ExampleWeights>,
}

/// Turns training samples into rows (packed or one per sample).
pub fn training_rows(samples: &[Sample], pack_rows: bool, max_len: usize) -> Vec<Row> {
    weighted_rows(samples, None, pack_rows, max_len)
}

/// [`training_rows`] with each example's loss weight c and distrust D when given.
pub fn weighted_rows(
    samples: &[Sample],
    weights: Option<&ExampleWeights>,
    pack_rows: bool,
    max_len: usize,
) -> Vec<Row> {
    let c: Vec<f32> = match weights {
        Some(w) => w.c.clone(),
        None => vec![1.0; samples.len()],
    };
    let d: Option<Vec<f32>> = weights.map(|w| w.d.iter().map(|&d| d as f32).collect());
    if pack_rows {
        let refs: Vec<&Sample> = samples.iter().collect();
        pack_with_d(&refs, &c, d.as_deref(), max_len)
    } else {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let row = Row::single(s, c[i]);
                match &d {
                    Some(d) => row.with_doc_d(vec![d[i]]),
                    None => row,
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub skipped: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub seconds: f64,
    pub peak_rss: Option<u64>,
    /// The GPU's memory in use at its highest sample (CUDA only, see memory::device).
    pub peak_gpu: Option<u64>,
    pub first_val: Option<f64>,
    pub last_val: Option<f64>,
    pub best_val: Option<(usize, f64)>,
    pub test: Option<(f64, usize)>,
    pub adapter_dir: PathBuf,
    pub final_loss: f64,
    /// Per-phase times, with `--profile`.
    pub profile: Option<Profile>,
}

/// Appends one JSON object per line to the metrics file.
struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        let file = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Continues a metrics file from a checkpoint at `step`: later lines (written after the
    /// checkpoint by the interrupted run) are dropped so every step appears once. When `step` is
    /// the run's last, the final evaluation, test and end records follow the checkpoint, so
    /// those of that step go too (they are written again).
    fn resume(path: &Path, step: usize, last: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                    return false;
                };
                match v["step"].as_u64() {
                    Some(s) if (s as usize) < step => true,
                    Some(s) if s as usize == step => !last || v["type"] == "train",
                    _ => false,
                }
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::io::write_file(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io("write", &self.path, e))
    }
}

/// The adapter files (PEFT layout, and the run's `train_config.json`) written into a staged
/// directory that will take the place of `dest`.
fn stage_adapter(
    adapter: &Adapter,
    dest: &Path,
    base_model: &str,
    config: &TrainConfig,
) -> Result<Staged> {
    let staged = Staged::replacing(dest)?;
    let tmp = &staged.tmp;
    std::fs::create_dir_all(tmp).map_err(|e| Error::io("create", tmp, e))?;
    adapter.save_peft(tmp, base_model)?;
    let cfg = serde_json::to_string_pretty(config).unwrap_or_default();
    crate::io::write_synced(&tmp.join("train_config.json"), cfg.as_bytes())?;
    Ok(staged)
}

/// Writes an adapter directory (`best/`) atomically: the complete new directory replaces the
/// old one, so a reader sees one or the other, never a mix.
pub fn save_adapter_dir(
    adapter: &Adapter,
    dir: &Path,
    base_model: &str,
    config: &TrainConfig,
) -> Result<()> {
    if let Some(parent) = dir.parent() {
        crate::io::clear_leftovers(parent);
    }
    stage_adapter(adapter, dir, base_model, config)?.commit()
}

/// Writes the adapter files into `dir`, which also holds metrics and other runs' outputs: each
/// file is renamed into place whole, so none is ever seen half-written.
pub fn save_adapter_files(
    adapter: &Adapter,
    dir: &Path,
    base_model: &str,
    config: &TrainConfig,
) -> Result<()> {
    let staged = stage_adapter(adapter, &dir.join("adapter"), base_model, config)?;
    crate::io::sync_path(&staged.tmp).map_err(|e| Error::io("sync", &staged.tmp, e))?;
    for entry in std::fs::read_dir(&staged.tmp).map_err(|e| Error::io("read", &staged.tmp, e))? {
        let p = entry.map_err(|e| Error::io("read", &staged.tmp, e))?.path();
        let dest = dir.join(p.file_name().unwrap_or_default());
        std::fs::rename(&p, &dest).map_err(|e| Error::io("rename into place", &dest, e))?;
    }
    crate::io::sync_dir(dir);
    Ok(())
}

fn validation_loss(model: &Llama, valid: &[Sample], cfg: &TrainConfig) -> Result<Option<f64>> {
    if valid.is_empty() {
        return Ok(None);
    }
    let n = if cfg.val_batches == 0 {
        valid.len()
    } else {
        (cfg.val_batches * cfg.batch_size).min(valid.len())
    };
    let r = evaluate(model, &valid[..n], cfg.batch_size)?;
    Ok((r.tokens > 0).then_some(r.loss))
}

/// Trains `model.adapter` (which must be set) on `data` as `cfg` says; continues from `resume`
/// when given (whose adapter is already in `model`).
/// `reload` loads the base model again, for `--reload-interval`; `start` (the pre-flight's
/// figures) becomes the metrics file's first record.
#[allow(clippy::too_many_arguments)] // until the Trainer struct replaces this function
pub fn train(
    cfg: &TrainConfig,
    mut model: Llama,
    data: &Datasets,
    data_sha256: &str,
    resume: Option<checkpoint::Loaded>,
    reload: &dyn Fn() -> Result<Llama>,
    start_record: serde_json::Value,
    meter: &memory::Meter,
) -> Result<Summary> {
    let adapter_dir = cfg.output.clone();
    let rows = weighted_rows(
        &data.train,
        data.weights.as_ref(),
        cfg.pack,
        cfg.max_seq_length,
    );
    let mut batcher = Batcher::new(rows, cfg.batch_size, cfg.seed);
    let schedule = Schedule::new(
        cfg.lr_schedule,
        cfg.learning_rate,
        cfg.min_lr,
        cfg.warmup_steps,
        cfg.steps,
    );
    let mut opt = AdamW::new(
        model.adapter.as_mut().expect("adapter attached"),
        cfg.weight_decay,
    )?;
    let mut progress = Progress::new(cfg.steps);
    let start = Instant::now();
    let mut summary = Summary {
        steps: 0,
        skipped: 0,
        tokens: 0,
        trained_tokens: 0,
        seconds: 0.0,
        peak_rss: None,
        peak_gpu: None,
        first_val: None,
        last_val: None,
        best_val: None,
        test: None,
        adapter_dir: adapter_dir.clone(),
        final_loss: f64::NAN,
        profile: None,
    };
    let mut first_step = 1;
    let mut nonfinite = 0;
    let mut metrics = match &resume {
        Some(r) => {
            let st = &r.state;
            opt.m = r.moments.0.clone();
            opt.v = r.moments.1.clone();
            opt.t = st.optimizer_t;
            batcher.restore(st.epoch, st.position);
            first_step = st.step + 1;
            nonfinite = st.nonfinite;
            summary.steps = st.step;
            summary.tokens = st.tokens;
            summary.trained_tokens = st.trained_tokens;
            summary.skipped = st.skipped;
            summary.first_val = st.first_val;
            summary.last_val = st.last_val;
            summary.best_val = st.best_val;
            Metrics::resume(&cfg.metrics_file, st.step, st.step >= cfg.steps)?
        }
        None => Metrics::create(&cfg.metrics_file)?,
    };
    let mut start_record = start_record;
    start_record["type"] = json!("start");
    start_record["step"] = json!(first_step - 1);
    metrics.write(start_record)?;
    let ckpt_root = cfg.output.join("checkpoints");
    let save_at = |model: &Llama, opt: &AdamW, state: checkpoint::TrainerState| {
        checkpoint::save(
            &ckpt_root,
            model.adapter.as_ref().expect("adapter attached"),
            opt,
            state,
            cfg,
            cfg.keep_checkpoints,
        )
    };
    let state_now =
        |step: usize, opt: &AdamW, batcher: &Batcher, summary: &Summary, nonfinite: usize| {
            checkpoint::TrainerState {
                format_version: checkpoint::FORMAT_VERSION,
                step,
                optimizer_t: opt.t,
                epoch: batcher.epoch,
                position: batcher.position,
                tokens: summary.tokens,
                trained_tokens: summary.trained_tokens,
                skipped: summary.skipped,
                nonfinite,
                first_val: summary.first_val,
                last_val: summary.last_val,
                best_val: summary.best_val,
                data_sha256: data_sha256.to_string(),
                config: serde_json::to_value(cfg).unwrap_or_default(),
                checksums: Default::default(),
            }
        };

    let run_eval = |model: &Llama,
                    step: usize,
                    summary: &mut Summary,
                    progress: &mut Progress,
                    metrics: &mut Metrics|
     -> Result<()> {
        let Some(val) = validation_loss(model, &data.valid, cfg)? else {
            return Ok(());
        };
        summary.first_val.get_or_insert(val);
        summary.last_val = Some(val);
        progress.message(&format!(
            "step {step}: val loss {val:.4}, val ppl {:.3}",
            val.exp()
        ));
        metrics
            .write(json!({"type": "eval", "step": step, "val_loss": val, "val_ppl": val.exp()}))?;
        if cfg.save_best && step > 0 && summary.best_val.is_none_or(|(_, b)| val < b) {
            summary.best_val = Some((step, val));
            save_adapter_dir(
                model.adapter.as_ref().expect("adapter attached"),
                &cfg.output.join("best"),
                &cfg.model,
                cfg,
            )?;
        }
        Ok(())
    };
    let keep_blocks = cfg.keep_blocks;
    if keep_blocks > 0 {
        progress.message(&format!(
            "activations: {keep_blocks} of {} adapted blocks keep theirs, the rest are recomputed",
            cfg.num_layers
        ));
    }
    // The budget the step checks itself against. A test can lower it after the pre-flight
    // (YOUR_AI_TEST_ENFORCE_BYTES, from step YOUR_AI_TEST_ENFORCE_STEP on) to cross it on demand.
    let env_usize = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let test_limit = env_usize("YOUR_AI_TEST_ENFORCE_BYTES");
    let test_from = env_usize("YOUR_AI_TEST_ENFORCE_STEP").unwrap_or(0) as usize;
    let mut limit = cfg.memory_budget;
    meter.set_limit(limit);
    let mut warned = false;
    let mut profile = Profile::default();
    if resume.is_none() {
        let clock = Instant::now();
        run_eval(&model, 0, &mut summary, &mut progress, &mut metrics)?;
        profile.eval += clock.elapsed();
    }

    let mut recent: VecDeque<(f64, usize)> = VecDeque::new();
    for step in first_step..=cfg.steps {
        if let Some(l) = test_limit.filter(|_| step >= test_from) {
            limit = l;
            meter.set_limit(l);
        }
        let t0 = Instant::now();
        // Where the data stood before this step, for a checkpoint if the step is abandoned.
        let cursor = (batcher.epoch, batcher.position);
        let batches: Vec<Vec<Row>> = (0..cfg.grad_accumulation_steps)
            .map(|_| batcher.next_batch().into_iter().cloned().collect())
            .collect();
        let total_targets: usize = batches.iter().flat_map(|b| b.iter().map(Row::scored)).sum();
        // Σ c·n over the accumulated batch; equal to `total_targets` (exactly) when unweighted.
        let total_weight: f64 = batches
            .iter()
            .flat_map(|b| b.iter().map(Row::scored_weight))
            .sum();
        let batch_d: Vec<f32> = batches
            .iter()
            .flat_map(|b| b.iter().flat_map(|r| r.doc_d.iter().copied()))
            .collect();
        let mean_d = (!batch_d.is_empty())
            .then(|| batch_d.iter().map(|&d| d as f64).sum::<f64>() / batch_d.len() as f64);
        let adapter = model.adapter.as_ref().expect("adapter attached");
        let mut grads = Grads::new(adapter);
        let mut sums = LossSums::default();
        let mut tokens = 0;
        if total_targets > 0 && total_weight > 0.0 {
            // Normalised by every scored token (times its weight) of the whole accumulated batch.
            let scale = 1.0 / total_weight;
            for (micro, rows) in batches.iter().enumerate() {
                let clock = Instant::now();
                let refs: Vec<&Row> = rows.iter().collect();
                let mut mb = micro_batch(&model, &refs)?;
                if cfg.lora_dropout > 0.0 {
                    let seed = cfg.seed ^ ((step as u64) << 20) ^ micro as u64;
                    mb.dropout = Some((cfg.lora_dropout, seed.wrapping_mul(0x2545_F491_4F6C_DD1D)));
                }
                tokens += mb.n_tokens;
                profile.data += clock.elapsed();
                let block_step = Step {
                    model: &model,
                    adapter,
                    keep_blocks,
                    meter,
                };
                let s = match block_step.forward_backward(&mb, scale, &mut grads, &mut profile) {
                    Ok(s) => s,
                    Err(e) => match e {
                        crate::engine::StepError::OverBudget { peak } => {
                            // Abandon the step: adapter and optimizer are still those of the
                            // step before, and so is the data cursor saved with them.
                            drop((grads, mb));
                            progress.finish();
                            let mut state =
                                state_now(step - 1, &opt, &batcher, &summary, nonfinite);
                            (state.epoch, state.position) = cursor;
                            let dir = checkpoint::save(
                                &ckpt_root,
                                adapter,
                                &opt,
                                state,
                                cfg,
                                cfg.keep_checkpoints,
                            )?;
                            return Err(Error::MemoryBudget {
                                measure: meter.measure().name(),
                                step,
                                saved_step: step - 1,
                                peak,
                                budget: limit,
                                checkpoint: dir,
                            });
                        }
                        crate::engine::StepError::Failed(e) => return Err(e),
                    },
                };
                sums.ce += s.ce;
                sums.weighted += s.weighted;
                sums.weight += s.weight;
            }
        }
        let loss = sums.ce / total_targets.max(1) as f64;
        let weighted_loss = data
            .weights
            .as_ref()
            .map(|_| sums.weighted / total_weight.max(f64::MIN_POSITIVE));
        let clock = Instant::now();
        grads.fill_missing(model.adapter.as_ref().expect("adapter attached"))?;
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        let lr = schedule.lr(step);
        if total_targets == 0 || total_weight <= 0.0 {
            progress.message(&format!(
                "step {step}: no trained tokens (or only tokens of weight 0) in this batch; update skipped"
            ));
            summary.skipped += 1;
        } else if !loss.is_finite() || !grad_norm.is_finite() {
            nonfinite += 1;
            summary.skipped += 1;
            progress.message(&format!("step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped"));
            if nonfinite >= MAX_NONFINITE {
                progress.finish();
                return Err(Error::Usage(format!(
                    "{MAX_NONFINITE} steps in a row had a non-finite loss or gradient; stopping. Try a lower --learning-rate (now {})",
                    cfg.learning_rate
                )));
            }
        } else {
            nonfinite = 0;
            opt.step(
                model.adapter.as_mut().expect("adapter attached"),
                &grads,
                lr,
            )?;
        }
        drop(grads);
        profile.optimizer += clock.elapsed();
        let dt = t0.elapsed().as_secs_f64();
        summary.steps = step;
        summary.tokens += tokens;
        summary.trained_tokens += total_targets;
        summary.final_loss = loss;
        recent.push_back((dt, tokens));
        if recent.len() > 10 {
            recent.pop_front();
        }
        let window: f64 = recent.iter().map(|r| r.0).sum();
        let window_tokens: usize = recent.iter().map(|r| r.1).sum();
        let reading = meter.read();
        let (rss, rss_phase_peak) = (reading.rss, reading.rss_phase_peak);
        // The budget's measure: resident memory, or the GPU's memory on CUDA.
        let gpu = meter.measure() == memory::Measure::Gpu;
        let (now, phase_peak) = (reading.now(), reading.phase_peak());
        if let Some(p) = phase_peak.filter(|&p| !warned && p as f64 > 0.9 * limit as f64) {
            warned = true;
            progress.message(&format!(
                "warning: step {step}: peak {} {:.2} GB is above 90% of the {:.2} GB budget; \
                 the run stops with a checkpoint if it crosses the budget",
                meter.measure().name(),
                memory::gb(p),
                memory::gb(limit)
            ));
        }
        progress.update(&StepReport {
            step,
            loss,
            lr,
            steps_per_s: recent.len() as f64 / window.max(1e-9),
            tokens_per_s: window_tokens as f64 / window.max(1e-9),
            mem_gb: now.map(memory::gb),
            distrust: weighted_loss.map(|w| (w, mean_d.unwrap_or(f64::NAN))),
        });
        let mut line = json!({
            "type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "trained_tokens": total_targets, "step_time_s": dt,
            "tokens_per_s": tokens as f64 / dt, "trained_tokens_per_s": total_targets as f64 / dt,
            "rss_bytes": rss, "peak_rss_bytes": reading.rss_peak,
            "train_peak_rss_bytes": rss_phase_peak, "memory_budget_bytes": limit,
            "epoch": batcher.epoch,
        });
        if gpu {
            line["gpu_bytes"] = json!(now);
            line["train_peak_gpu_bytes"] = json!(phase_peak);
        }
        if let Some(w) = weighted_loss {
            // The plain CE stays in "loss"; D is reported, never added to the loss.
            line["weighted_loss"] = json!(w);
            line["mean_d"] = json!(mean_d);
        }
        metrics.write(line)?;
        if cfg
            .memory_report_interval
            .is_some_and(|n| n > 0 && step % n == 0)
        {
            progress.message(&format!(
                "step {step}: {} {:.2} GB, peak {:.2} GB",
                meter.measure().name(),
                now.map(memory::gb).unwrap_or(f64::NAN),
                meter.peak().map(memory::gb).unwrap_or(f64::NAN)
            ));
        }
        if cfg.steps_per_eval > 0 && step % cfg.steps_per_eval == 0 && step != cfg.steps {
            let clock = Instant::now();
            run_eval(&model, step, &mut summary, &mut progress, &mut metrics)?;
            profile.eval += clock.elapsed();
        }
        if let Some(peak) = meter.over_limit() {
            // Crossed outside the blocks (head, optimizer, evaluation): this step is complete.
            progress.finish();
            let dir = save_at(
                &model,
                &opt,
                state_now(step, &opt, &batcher, &summary, nonfinite),
            )?;
            return Err(Error::MemoryBudget {
                measure: meter.measure().name(),
                step,
                saved_step: step,
                peak,
                budget: limit,
                checkpoint: dir,
            });
        }
        let signal = crate::runtime::signals::requested();
        if (cfg.save_every > 0 && step % cfg.save_every == 0)
            || step == cfg.steps
            || signal.is_some()
        {
            let dir = save_at(
                &model,
                &opt,
                state_now(step, &opt, &batcher, &summary, nonfinite),
            )?;
            if signal.is_none() && step != cfg.steps {
                progress.message(&format!(
                    "step {step}: checkpoint saved to {}",
                    dir.display()
                ));
            }
            if let Some(sig) = signal {
                progress.finish();
                return Err(Error::Interrupted {
                    signal: sig,
                    step,
                    checkpoint: dir,
                });
            }
        }
        if cfg
            .reload_interval
            .is_some_and(|n| n > 0 && step % n == 0 && step != cfg.steps)
        {
            let clock = Instant::now();
            let dir = save_at(
                &model,
                &opt,
                state_now(step, &opt, &batcher, &summary, nonfinite),
            )?;
            memory::release_free();
            let before = memory::current_rss();
            // Everything goes before anything comes back, so old and new never coexist.
            let device = model.device.clone();
            drop(opt);
            drop(model);
            memory::release_free();
            model = reload()?;
            let loaded = checkpoint::load(&dir, &device)?;
            let mut adapter = Adapter::load_peft(&dir, &model.cfg, &device)?;
            opt = AdamW::new(&mut adapter, cfg.weight_decay)?;
            (opt.m, opt.v) = loaded.moments;
            opt.t = loaded.state.optimizer_t;
            batcher.restore(loaded.state.epoch, loaded.state.position);
            model.adapter = Some(adapter);
            memory::release_free();
            let after = memory::current_rss();
            progress.message(&format!(
                "step {step}: reloaded model, adapter and optimizer from {} ({:.2} GB resident before, {:.2} GB after)",
                dir.display(),
                before.map(memory::gb).unwrap_or(f64::NAN),
                after.map(memory::gb).unwrap_or(f64::NAN)
            ));
            metrics.write(
                json!({"type": "reload", "step": step, "rss_before_bytes": before,
                "rss_after_bytes": after, "seconds": clock.elapsed().as_secs_f64()}),
            )?;
        }
    }
    let clock = Instant::now();
    run_eval(&model, cfg.steps, &mut summary, &mut progress, &mut metrics)?;
    profile.eval += clock.elapsed();
    progress.finish();
    save_adapter_files(
        model.adapter.as_ref().expect("adapter attached"),
        &adapter_dir,
        &cfg.model,
        cfg,
    )?;
    if cfg.test && !data.test.is_empty() {
        let r = evaluate(&model, &data.test, cfg.batch_size)?;
        metrics.write(json!({"type": "test", "step": cfg.steps, "test_loss": r.loss, "test_ppl": r.perplexity(), "tokens": r.tokens}))?;
        summary.test = Some((r.loss, r.tokens));
    }
    summary.seconds = start.elapsed().as_secs_f64();
    let reading = meter.read();
    summary.peak_rss = reading.rss_peak;
    summary.peak_gpu = reading.gpu_peak;
    // After the final save: the whole run's peak, for benchmarks and post-mortems.
    let mut end = json!({"type": "end", "step": cfg.steps, "peak_rss_bytes": summary.peak_rss,
        "train_peak_rss_bytes": reading.rss_phase_peak, "seconds": summary.seconds});
    if meter.measure() == memory::Measure::Gpu {
        end["peak_gpu_bytes"] = json!(summary.peak_gpu);
        end["train_peak_gpu_bytes"] = json!(reading.gpu_phase_peak);
    }
    if cfg.profile {
        // Seconds per phase over the run, for scripts (scripts/bench/scaling.sh).
        let mut phases: serde_json::Map<String, serde_json::Value> = profile
            .phases()
            .iter()
            .map(|(n, s)| (n.to_string(), json!(s)))
            .collect();
        phases.insert("attention".into(), json!(profile.attention.as_secs_f64()));
        end["profile_seconds"] = phases.into();
    }
    metrics.write(end)?;
    summary.profile = cfg.profile.then_some(profile);
    Ok(summary)
}

impl Summary {
    pub fn print(&self) {
        let secs = self.seconds.max(1e-9);
        eprintln!(
            "\nTraining finished: {} steps in {:.1} s ({} skipped)",
            self.steps, self.seconds, self.skipped
        );
        eprintln!(
            "  tokens: {} total ({:.0} tokens/s), {} trained ({:.0} trained tokens/s)",
            self.tokens,
            self.tokens as f64 / secs,
            self.trained_tokens,
            self.trained_tokens as f64 / secs
        );
        if let Some(p) = self.peak_rss {
            eprintln!("  peak memory: {:.2} GB resident", memory::gb(p));
        }
        if let Some(p) = self.peak_gpu {
            eprintln!("  peak GPU memory: {:.2} GB", memory::gb(p));
        }
        // NaN when a resumed run had no step left to train (only the final adapter to write).
        if self.final_loss.is_finite() {
            eprintln!("  final train loss: {:.4}", self.final_loss);
        }
        if let (Some(a), Some(b)) = (self.first_val, self.last_val) {
            eprintln!("  validation loss: {a:.4} at start → {b:.4} at end");
        }
        if let Some((step, v)) = self.best_val {
            eprintln!(
                "  best validation loss {v:.4} at step {step} (adapter in {})",
                self.adapter_dir.join("best").display()
            );
        }
        if let Some((loss, tokens)) = self.test {
            eprintln!(
                "  test loss: {loss:.4}, perplexity {:.3} ({tokens} tokens)",
                loss.exp()
            );
        }
        eprintln!("  adapter: {}", self.adapter_dir.display());
        if let Some(p) = &self.profile {
            let total: f64 = p.phases().iter().map(|x| x.1).sum();
            eprintln!(
                "\nTime by phase ({} steps; per step, and share of the run):",
                self.steps
            );
            let line = |name: &str, secs: f64| {
                eprintln!(
                    "  {name:<32} {:>8.3} s/step {:>5.1}%",
                    secs / self.steps.max(1) as f64,
                    100.0 * secs / total.max(1e-9)
                )
            };
            for (name, secs) in p.phases() {
                line(name, secs);
            }
            line(
                "  of which attention (all blocks)",
                p.attention.as_secs_f64(),
            );
        }
    }
}
