//! The training recipe, read top to bottom in [`Trainer::run`]: set up (or resume), then for
//! each step: train it, evaluate, check the memory budget, checkpoint, reload; then finish.
//! Everything here is shared by every engine; the arithmetic is the [`Engine`]'s.

use super::checkpoint;
use super::config::TrainConfig;
use super::metrics::Metrics;
use super::progress::{Progress, StepReport};
use super::schedule::Schedule;
use super::summary::Summary;
use crate::data::batch::{weighted_rows, Batcher, ExampleWeights, Row};
use crate::data::preference::pair_rows;
use crate::data::preference::Pair;
use crate::data::Sample;
use crate::engine::objective::{Method, PreferenceLoss, PreferenceSums};
use crate::engine::{Engine, LossSums, MicroBatchRows, Profile, StepError};
use crate::error::{Error, Result};
use crate::model::lora::{Adapter, LoraConfig};
use crate::model::ModelConfig;
use crate::runtime::memory;
use serde_json::json;
use std::collections::VecDeque;
use std::time::Instant;

mod saves;
pub use saves::{save_adapter_dir, save_adapter_files};

/// Consecutive non-finite steps after which the run stops as diverged.
pub const MAX_NONFINITE: usize = 3;

pub struct Datasets {
    pub train: Vec<Sample>,
    pub valid: Vec<Sample>,
    pub test: Vec<Sample>,
    /// Distrust weights of the training examples (`train --distrust`); None for plain training.
    pub weights: Option<ExampleWeights>,
    /// Preference pairs (`--method dpo|orpo`), which take the place of the samples.
    pub pairs: Option<PreferenceSets>,
}

/// The preference pairs of a run's files.
pub struct PreferenceSets {
    pub train: Vec<Pair>,
    pub valid: Vec<Pair>,
    pub test: Vec<Pair>,
}

/// The adapter a run starts from: the checkpoint's when resuming, else a fresh one from the
/// seed (the same on every engine: it is made here, on the host).
pub fn initial_adapter(
    cfg: &TrainConfig,
    model: &ModelConfig,
    resume: Option<&checkpoint::Loaded>,
) -> Result<Adapter> {
    if let Some(r) = resume {
        return r.adapter(model);
    }
    let layers = model.num_hidden_layers;
    let lora = LoraConfig {
        rank: cfg.lora.lora_rank,
        alpha: cfg.lora.alpha(),
        dropout: cfg.lora.lora_dropout,
        targets: cfg.lora.targets(),
        layers: (layers - cfg.num_layers().min(layers)..layers).collect(),
        use_rslora: false,
    };
    Ok(Adapter::init(
        lora,
        model,
        cfg.schedule.seed,
        &candle_core::Device::Cpu,
    )?)
}

/// What one step computed, for the progress line and the metrics.
struct StepFigures {
    loss: f64,
    weighted_loss: Option<f64>,
    mean_d: Option<f64>,
    lr: f64,
    grad_norm: f64,
    tokens: usize,
    trained_tokens: usize,
    seconds: f64,
    /// Preference tuning: the batch's pair sums.
    pairs: Option<PreferenceSums>,
    /// Why the update was skipped, if it was.
    skipped: Option<&'static str>,
}

/// A training run in progress over an engine.
pub struct Trainer<'a, E: Engine> {
    cfg: &'a TrainConfig,
    data: &'a Datasets,
    data_sha256: String,
    engine: E,
    batcher: Batcher,
    schedule: Schedule,
    metrics: Metrics,
    progress: Progress,
    summary: Summary,
    profile: Profile,
    /// The first step this process trains (1, or the one after the resumed checkpoint).
    first_step: usize,
    /// Whether the run continues from a checkpoint (its step-0 evaluation is already logged).
    resumed: bool,
    /// The resumed checkpoint's step, when a stop cut its validation short: done first.
    pending_eval: Option<usize>,
    /// The last step whose validation ran to its end.
    last_eval: Option<usize>,
    /// A stop cut the validation short: the checkpoint saved for it says it is to be redone.
    eval_cut_short: bool,
    /// Non-finite steps in a row.
    nonfinite: usize,
    /// Whether the 90%-of-budget warning was shown.
    warned: bool,
    /// `(seconds, tokens)` of the last steps, for the rates on the progress line.
    recent: VecDeque<(f64, usize)>,
    started: Instant,
}

impl<'a, E: Engine> Trainer<'a, E> {
    /// Setup, or resume from `resume`: the engine gets `adapter` (and the checkpoint's
    /// optimizer), the data cursor and counters are restored, the metrics file is started or
    /// continued with `start_record` (the pre-flight's figures).
    pub fn new(
        cfg: &'a TrainConfig,
        mut engine: E,
        data: &'a Datasets,
        data_sha256: &str,
        adapter: Adapter,
        resume: Option<checkpoint::Loaded>,
        mut start_record: serde_json::Value,
    ) -> Result<Self> {
        let mut batcher = match &data.pairs {
            Some(p) => Batcher::of_units(
                p.train.chunks(1).map(pair_rows).collect(),
                cfg.batch.batch_size,
                cfg.schedule.seed,
            ),
            None => Batcher::new(
                weighted_rows(
                    &data.train,
                    data.weights.as_ref(),
                    cfg.schedule.pack,
                    cfg.batch.max_seq_length,
                ),
                cfg.batch.batch_size,
                cfg.schedule.seed,
            ),
        };
        let s = &cfg.schedule;
        let schedule = Schedule::new(
            s.lr_schedule,
            s.learning_rate,
            s.min_lr,
            s.warmup_steps,
            cfg.steps,
        );
        engine.set_adapter(adapter, resume.as_ref().map(|r| r.optimizer.clone()))?;
        let mut summary = Summary::new(cfg.output_dir());
        // The checkpoint's validation is still to do: a stop cut it short, or the checkpoint
        // is of the run's last step (as shortened now) and its validation never ran.
        let pending = |st: &checkpoint::TrainerState| {
            st.eval_pending || (st.step >= cfg.steps && st.last_eval_step != Some(st.step))
        };
        let (first_step, nonfinite, metrics) = match &resume {
            Some(r) => {
                let st = &r.state;
                batcher.restore(st.epoch, st.position);
                summary.resume_from(st);
                let metrics = Metrics::resume(&cfg.metrics_file(), st.step, pending(st))?;
                (st.step + 1, st.nonfinite, metrics)
            }
            None => (1, 0, Metrics::create(&cfg.metrics_file())?),
        };
        let mut trainer = Self {
            cfg,
            data,
            data_sha256: data_sha256.to_string(),
            engine,
            batcher,
            schedule,
            metrics,
            progress: Progress::new(cfg.steps),
            summary,
            profile: Profile::default(),
            first_step,
            resumed: resume.is_some(),
            pending_eval: resume
                .as_ref()
                .filter(|r| pending(&r.state))
                .map(|r| r.state.step),
            last_eval: resume.as_ref().and_then(|r| r.state.last_eval_step),
            eval_cut_short: false,
            nonfinite,
            warned: false,
            recent: VecDeque::new(),
            started: Instant::now(),
        };
        start_record["type"] = json!("start");
        start_record["step"] = json!(first_step - 1);
        trainer.metrics.write(start_record)?;
        if cfg.keep_blocks > 0 {
            trainer.progress.message(&format!(
                "activations: {} of {} adapted blocks keep theirs, the rest are recomputed",
                cfg.keep_blocks,
                cfg.num_layers()
            ));
        }
        trainer.engine.meter().set_limit(cfg.memory_budget);
        Ok(trainer)
    }

    /// The recipe: evaluate at the start, then step by step train, evaluate, hold the budget,
    /// checkpoint and reload as the configuration says; then finish.
    pub fn run(mut self) -> Result<Summary> {
        match self.pending_eval {
            _ if !self.resumed => self.evaluate(0)?,
            Some(step) => self.evaluate(step)?,
            None => {}
        }
        for step in self.first_step..=self.cfg.steps {
            self.apply_test_limit(step);
            self.train_step(step)?;
            let every = self.cfg.output.steps_per_eval;
            // The last step's too, before its checkpoint: a run extended from that checkpoint
            // knows its validation (else `best/` could go to a worse, later step).
            if (every > 0 && step % every == 0) || step == self.cfg.steps {
                self.evaluate(step)?;
            }
            if let Some(peak) = self.engine.meter().over_limit() {
                // Crossed outside the blocks (head, optimizer, evaluation): this step is
                // complete, so it is what the checkpoint holds.
                return Err(self.stop_over_budget(step, step, peak, self.cursor())?);
            }
            self.checkpoint(step)?;
            let reload = self.cfg.memory.reload_interval;
            if reload.is_some_and(|n| n > 0 && step % n == 0 && step != self.cfg.steps) {
                self.reload(step)?;
            }
        }
        self.finish()
    }

    /// For tests (`--test-memory-limit BYTES@STEP`): from that step on, the budget the step
    /// checks is lowered, so it can be crossed on demand.
    fn apply_test_limit(&mut self, step: usize) {
        if let Some((bytes, from)) = self.cfg.memory.test_memory_limit {
            if step >= from {
                self.engine.meter().set_limit(bytes);
            }
        }
    }

    fn cursor(&self) -> (u64, usize) {
        (self.batcher.epoch, self.batcher.position)
    }

    /// One optimizer step: the accumulated micro-batches through the engine, then clipping
    /// and the update (skipped when nothing is scored or the loss is not finite).
    fn train_step(&mut self, step: usize) -> Result<()> {
        let cfg = self.cfg;
        let t0 = Instant::now();
        // Where the data stood before this step, for a checkpoint if the step is abandoned.
        let cursor = self.cursor();
        let batches: Vec<Vec<Row>> = (0..cfg.schedule.grad_accumulation_steps)
            .map(|_| self.batcher.next_batch().into_iter().cloned().collect())
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
        let trainable = total_targets > 0 && total_weight > 0.0;
        let preference = self.preference_loss(&batches);
        let mut sums = LossSums::default();
        let mut pair_sums = PreferenceSums::default();
        let mut tokens = 0;
        if trainable {
            // Normalised by every scored token (times its weight) of the whole accumulated batch.
            let loss_scale = 1.0 / total_weight;
            for (micro, rows) in batches.iter().enumerate() {
                let dropout = (cfg.lora.lora_dropout > 0.0).then(|| {
                    let seed = cfg.schedule.seed ^ ((step as u64) << 20) ^ micro as u64;
                    (
                        cfg.lora.lora_dropout,
                        seed.wrapping_mul(0x2545_F491_4F6C_DD1D),
                    )
                });
                tokens += rows.iter().map(Row::len).sum::<usize>();
                let batch = MicroBatchRows {
                    rows,
                    dropout,
                    loss_scale,
                };
                let done = match &preference {
                    Some(loss) => self
                        .engine
                        .accumulate_pairs(&batch, loss, &mut self.profile)
                        .map(|s| pair_sums.merge(&s)),
                    None => self.engine.accumulate(&batch, &mut self.profile).map(|s| {
                        sums.ce += s.ce;
                        sums.weighted += s.weighted;
                        sums.weight += s.weight;
                    }),
                };
                match done {
                    Ok(()) => {}
                    // The adapter and optimizer are still those of the step before, and so is
                    // the data cursor saved with them.
                    Err(StepError::OverBudget { peak }) => {
                        return Err(self.stop_over_budget(step, step - 1, peak, cursor)?)
                    }
                    Err(StepError::Stopped { signal }) => {
                        return Err(self.stop_for_signal(signal, step - 1, cursor)?)
                    }
                    Err(StepError::Failed(e)) => return Err(e),
                }
            }
        }
        // A batch with nothing scored has no loss: NaN, written as null, not a 0 that reads as
        // a perfect fit.
        let loss = match &preference {
            _ if !trainable => f64::NAN,
            Some(p) => pair_sums.objective(p.method),
            None => sums.ce / total_targets as f64,
        };
        let weighted_loss = self
            .data
            .weights
            .as_ref()
            .map(|_| sums.weighted / total_weight.max(f64::MIN_POSITIVE))
            .map(|w| if trainable { w } else { f64::NAN });
        let clock = Instant::now();
        let mut grad_norm = self.engine.clip_gradients(cfg.schedule.max_grad_norm)?;
        let lr = self.schedule.lr(step);
        let skipped = if !trainable {
            self.progress.message(&format!(
                "step {step}: no trained tokens (or only tokens of weight 0) in this batch; update skipped"
            ));
            grad_norm = f64::NAN;
            Some("no trained tokens")
        } else if !loss.is_finite() || !grad_norm.is_finite() {
            self.nonfinite += 1;
            self.progress.message(&format!(
                "step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped"
            ));
            if self.nonfinite >= MAX_NONFINITE {
                self.progress.finish();
                return Err(self.diverged(format!(
                    "{MAX_NONFINITE} steps in a row had a non-finite loss or gradient"
                )));
            }
            Some("non-finite loss or gradient")
        } else {
            self.nonfinite = 0;
            self.engine.update(lr)?;
            None
        };
        if skipped.is_some() {
            self.summary.skipped += 1;
            self.engine.discard_gradients();
        }
        self.profile.optimizer += clock.elapsed();
        self.report(
            step,
            StepFigures {
                loss,
                weighted_loss,
                mean_d,
                lr,
                grad_norm,
                tokens,
                trained_tokens: total_targets,
                seconds: t0.elapsed().as_secs_f64(),
                pairs: preference.map(|_| pair_sums),
                skipped,
            },
        )
    }

    /// The preference loss of an accumulated batch of pairs (None: SFT): each pair weighs
    /// 1/pairs, and ORPO's NLL each chosen token 1/(chosen tokens).
    fn preference_loss(&self, batches: &[Vec<Row>]) -> Option<PreferenceLoss> {
        let o = &self.cfg.objective;
        if !o.method.is_preference() {
            return None;
        }
        let pairs: usize = batches.iter().map(|b| b.len() / 2).sum();
        let chosen_tokens: usize = batches
            .iter()
            .flat_map(|b| b.iter().step_by(2).map(Row::scored))
            .sum();
        Some(PreferenceLoss {
            method: o.method,
            beta: o.beta,
            pair_scale: 1.0 / pairs.max(1) as f64,
            token_scale: 1.0 / chosen_tokens.max(1) as f64,
        })
    }

    /// The progress line, the metrics record and the memory warnings of one step.
    fn report(&mut self, step: usize, f: StepFigures) -> Result<()> {
        let meter = self.engine.meter();
        let limit = meter.limit();
        self.summary.steps = step;
        self.summary.tokens += f.tokens;
        self.summary.trained_tokens += f.trained_tokens;
        self.summary.run_steps += 1;
        self.summary.run_tokens.0 += f.tokens;
        self.summary.run_tokens.1 += f.trained_tokens;
        self.summary.step_seconds += f.seconds;
        if f.skipped.is_none() {
            self.summary.final_loss = f.loss;
        }
        self.recent.push_back((f.seconds, f.tokens));
        if self.recent.len() > 10 {
            self.recent.pop_front();
        }
        let window: f64 = self.recent.iter().map(|r| r.0).sum();
        let window_tokens: usize = self.recent.iter().map(|r| r.1).sum();
        let reading = meter.read();
        let (now, phase_peak) = (reading.now(), reading.phase_peak());
        if let Some(p) = phase_peak.filter(|&p| !self.warned && p as f64 > 0.9 * limit as f64) {
            self.warned = true;
            self.progress.message(&format!(
                "warning: step {step}: peak {} {:.2} GB is above 90% of the {:.2} GB budget; \
                 the run stops with a checkpoint if it crosses the budget",
                meter.measure().name(),
                memory::gb(p),
                memory::gb(limit)
            ));
        }
        self.progress.update(&StepReport {
            step,
            loss: f.loss,
            lr: f.lr,
            steps_per_s: self.recent.len() as f64 / window.max(1e-9),
            tokens_per_s: window_tokens as f64 / window.max(1e-9),
            mem_gb: now.map(memory::gb),
            mlx_gb: reading
                .cache
                .map(|c| (memory::gb(phase_peak.unwrap_or(0)), memory::gb(c))),
            distrust: f.weighted_loss.map(|w| (w, f.mean_d.unwrap_or(f64::NAN))),
            preference: f.pairs.map(|p| (p.accuracy(), p.margin())),
        });
        let mut line = json!({
            "type": "train", "step": step, "loss": f.loss, "lr": f.lr, "grad_norm": f.grad_norm,
            "tokens": f.tokens, "trained_tokens": f.trained_tokens, "step_time_s": f.seconds,
            "tokens_per_s": f.tokens as f64 / f.seconds,
            "trained_tokens_per_s": f.trained_tokens as f64 / f.seconds,
            "rss_bytes": reading.rss, "peak_rss_bytes": reading.rss_peak,
            "train_peak_rss_bytes": reading.rss_phase_peak, "memory_budget_bytes": limit,
            "epoch": self.batcher.epoch,
        });
        if let Some(why) = f.skipped {
            line["skipped"] = json!(why);
        }
        if let Some(cache) = reading.cache {
            // The MLX engine: MLX's active memory, its peak over training, and its cache.
            line["mlx_active_bytes"] = json!(now);
            line["train_peak_mlx_bytes"] = json!(phase_peak);
            line["mlx_cache_bytes"] = json!(cache);
        }
        if let Some(p) = f.pairs {
            line["method"] = json!(self.cfg.objective.method.name());
            line["reward_accuracy"] = json!(p.accuracy());
            line["reward_margin"] = json!(p.margin());
            line["chosen_reward"] = json!(p.chosen());
            line["rejected_reward"] = json!(p.rejected());
            if self.cfg.objective.method == Method::Orpo {
                line["nll"] = json!(p.chosen_ce / p.chosen_tokens.max(1) as f64);
            }
        }
        if let Some(w) = f.weighted_loss {
            // The plain CE stays in "loss"; D is reported, never added to the loss.
            line["weighted_loss"] = json!(w);
            line["mean_d"] = json!(f.mean_d);
        }
        self.metrics.write(line)?;
        let every = self.cfg.output.memory_report_interval;
        if every.is_some_and(|n| n > 0 && step.is_multiple_of(n)) {
            let peak = meter.peak();
            self.progress.message(&format!(
                "step {step}: {} {:.2} GB, peak {:.2} GB",
                meter.measure().name(),
                now.map(memory::gb).unwrap_or(f64::NAN),
                peak.map(memory::gb).unwrap_or(f64::NAN)
            ));
        }
        Ok(())
    }

    /// Validation loss at `step` (logged, and kept in `best/` when it is the best so far).
    fn evaluate(&mut self, step: usize) -> Result<()> {
        let clock = Instant::now();
        let cfg = self.cfg;
        let valid = match &self.data.pairs {
            Some(p) => p.valid.len(),
            None => self.data.valid.len(),
        };
        if valid > 0 {
            let n = match cfg.output.val_batches {
                0 => valid,
                b => (b * cfg.batch.batch_size).min(valid),
            };
            let bs = cfg.batch.batch_size;
            let result = match &self.data.pairs {
                Some(p) => {
                    let o = &cfg.objective;
                    self.engine
                        .evaluate_pairs(&p.valid[..n], bs, o.method, o.beta)
                        .map(|s| (s.pairs > 0).then(|| (s.objective(o.method), Some(s))))
                }
                None => self
                    .engine
                    .evaluate(&self.data.valid[..n], bs)
                    .map(|r| (r.tokens > 0).then_some((r.loss, None))),
            };
            let scored = match result {
                Ok(r) => r,
                // Stopped mid-evaluation: the step itself is complete, so it is saved, with
                // its validation still to do (a resumed run does it first, as `best/` needs).
                Err(Error::Stopping { signal }) => {
                    self.eval_cut_short = true;
                    return Err(self.stop_for_signal(signal, step, self.cursor())?);
                }
                Err(e) => return Err(e),
            };
            if let Some((val, pair_sums)) = scored {
                self.record_validation(step, val, pair_sums)?;
            }
        }
        self.last_eval = Some(step);
        self.profile.eval += clock.elapsed();
        Ok(())
    }

    fn record_validation(
        &mut self,
        step: usize,
        val: f64,
        pairs: Option<PreferenceSums>,
    ) -> Result<()> {
        let cfg = self.cfg;
        let s = &mut self.summary;
        s.first_val.get_or_insert(val);
        s.last_val = Some(val);
        let mut record = json!({"type": "eval", "step": step, "val_loss": val});
        match pairs {
            Some(p) => {
                self.progress.message(&format!(
                    "step {step}: val {} loss {val:.4}, reward accuracy {:.1}%, margin {:.3}",
                    cfg.objective.method.name(),
                    100.0 * p.accuracy(),
                    p.margin()
                ));
                record["val_reward_accuracy"] = json!(p.accuracy());
                record["val_reward_margin"] = json!(p.margin());
                record["val_prefers_chosen"] = json!(p.prefers_chosen());
            }
            None => {
                self.progress.message(&format!(
                    "step {step}: val loss {val:.4}, val ppl {:.3}",
                    val.exp()
                ));
                record["val_ppl"] = json!(val.exp());
            }
        }
        self.metrics.write(record)?;
        // A non-finite loss is never the best.
        let better = val.is_finite() && s.best_val.is_none_or(|(_, b)| val < b);
        if cfg.output.save_best && step > 0 && better {
            s.best_val = Some((step, val));
            let adapter = self.finite_adapter()?;
            save_adapter_dir(&adapter, &cfg.output_dir().join("best"), cfg)?;
        }
        Ok(())
    }

    /// The final evaluation, the adapter files, the test set, and the end record.
    fn finish(mut self) -> Result<Summary> {
        let cfg = self.cfg;
        self.progress.finish();
        if self.summary.steps > 0 && self.summary.skipped >= self.summary.steps {
            // The adapter is still the untrained one: writing it as the result would pass for
            // a run that trained, and so would a best/ that a validation kept.
            crate::io::remove(&cfg.output_dir().join("best"))?;
            return Err(Error::NothingTrained {
                steps: self.summary.steps,
            });
        }
        crate::runtime::signals::finishing();
        save_adapter_files(&self.finite_adapter()?, cfg.output_dir(), cfg)?;
        if let Some(signal) = crate::runtime::signals::requested() {
            // As the signal's note said: the adapter is kept, the rest (the test set, the end
            // record) skipped; `--resume` from the last checkpoint would redo them.
            eprintln!("the trained adapter is in {}", cfg.output_dir().display());
            return Err(Error::Stopping { signal });
        }
        if let (true, Some(p)) = (cfg.output.test, &self.data.pairs) {
            let o = &cfg.objective;
            let r = self
                .engine
                .evaluate_pairs(&p.test, cfg.batch.batch_size, o.method, o.beta)?;
            let loss = r.objective(o.method);
            self.metrics
                .write(json!({"type": "test", "step": cfg.steps, "test_loss": loss,
                "test_reward_accuracy": r.accuracy(), "test_reward_margin": r.margin(),
                "pairs": r.pairs}))?;
            self.summary.test_pairs = Some((loss, r.accuracy(), r.pairs));
        } else if cfg.output.test && !self.data.test.is_empty() {
            let r = self
                .engine
                .evaluate(&self.data.test, cfg.batch.batch_size)?;
            self.metrics.write(
                json!({"type": "test", "step": cfg.steps, "test_loss": r.loss,
                "test_ppl": r.perplexity(), "tokens": r.tokens}),
            )?;
            self.summary.test = Some((r.loss, r.tokens));
        }
        let meter = self.engine.meter();
        let reading = meter.read();
        let s = &mut self.summary;
        s.seconds = self.started.elapsed().as_secs_f64();
        s.peak_rss = reading.rss_peak;
        s.peak_mlx = reading.mlx_peak;
        // After the final save: the whole run's peak, for benchmarks and post-mortems.
        let mut end = json!({"type": "end", "step": cfg.steps, "peak_rss_bytes": s.peak_rss,
            "train_peak_rss_bytes": reading.rss_phase_peak, "seconds": s.seconds});
        if meter.measure() == memory::Measure::Mlx {
            end["peak_mlx_bytes"] = json!(reading.mlx_peak);
            end["train_peak_mlx_bytes"] = json!(reading.mlx_phase_peak);
        }
        if cfg.output.profile {
            // Seconds per phase over the run, for scripts (scripts/bench/scaling.sh).
            let mut phases: serde_json::Map<String, serde_json::Value> = self
                .profile
                .phases()
                .iter()
                .map(|(n, s)| (n.to_string(), json!(s)))
                .collect();
            phases.insert(
                "attention".into(),
                json!(self.profile.attention.as_secs_f64()),
            );
            end["profile_seconds"] = phases.into();
        }
        self.metrics.write(end)?;
        let mut summary = self.summary;
        summary.profile = cfg.output.profile.then_some(self.profile);
        Ok(summary)
    }
}
