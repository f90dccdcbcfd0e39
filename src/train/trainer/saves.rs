//! What the trainer writes and how it stops: checkpoints (every `--save-every`, at the end,
//! on a signal, before a reload), the stop with a checkpoint when the budget is crossed or a
//! signal comes, the reload, and the adapter directories. A NaN or infinite adapter is never
//! written.

use super::Trainer;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::io::Staged;
use crate::model::lora::Adapter;
use crate::runtime::{memory, signals};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::TrainConfig;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

impl<E: Engine> Trainer<'_, E> {
    /// A checkpoint at `step` of the adapter, the optimizer and the data `cursor`.
    pub(super) fn save(&self, step: usize, cursor: (u64, usize)) -> Result<PathBuf> {
        let s = &self.summary;
        let optimizer = self.engine.optimizer_state()?;
        let state = TrainerState {
            format_version: checkpoint::FORMAT_VERSION,
            step,
            optimizer_t: optimizer.t,
            epoch: cursor.0,
            position: cursor.1,
            tokens: s.tokens,
            trained_tokens: s.trained_tokens,
            skipped: s.skipped,
            nonfinite: self.nonfinite,
            first_val: s.first_val,
            last_val: s.last_val,
            best_val: s.best_val,
            eval_pending: self.eval_cut_short,
            last_eval_step: self.last_eval,
            data_sha256: self.data_sha256.clone(),
            config: serde_json::to_value(self.cfg).unwrap_or_default(),
            checksums: Default::default(),
        };
        checkpoint::save(
            &self.cfg.output_dir().join("checkpoints"),
            &self.finite_adapter()?,
            &optimizer,
            state,
            self.cfg,
            self.cfg.output.keep_checkpoints,
        )
    }

    pub(super) fn diverged(&self, what: String) -> Error {
        Error::Diverged {
            what,
            learning_rate: self.cfg.schedule.learning_rate,
        }
    }

    /// The adapter as it is now, refused when any value is NaN or infinite: such an adapter
    /// is never written (not to a checkpoint, not to `best/`, not as the result).
    pub(super) fn finite_adapter(&self) -> Result<Adapter> {
        let adapter = self.engine.adapter()?;
        match adapter.first_non_finite() {
            Some(name) => Err(self.diverged(format!("{name} holds NaN or infinite values"))),
            None => Ok(adapter),
        }
    }

    /// The run crossed its memory budget during `step`: saves the checkpoint of `saved_step`
    /// (with the data `cursor` of that step) and returns the error that ends the run.
    pub(super) fn stop_over_budget(
        &mut self,
        step: usize,
        saved_step: usize,
        peak: u64,
        cursor: (u64, usize),
    ) -> Result<Error> {
        self.engine.discard_gradients();
        self.progress.finish();
        let dir = self.save(saved_step, cursor)?;
        let meter = self.engine.meter();
        Ok(Error::MemoryBudget {
            measure: meter.measure().name(),
            step,
            saved_step,
            peak,
            budget: meter.limit(),
            checkpoint: dir,
        })
    }

    /// A stop signal came: saves the checkpoint of `saved_step` (with the data `cursor` of
    /// that step) and returns the error that ends the run.
    pub(super) fn stop_for_signal(
        &mut self,
        signal: i32,
        saved_step: usize,
        cursor: (u64, usize),
    ) -> Result<Error> {
        self.engine.discard_gradients();
        self.progress.finish();
        let dir = self.save(saved_step, cursor)?;
        Ok(Error::Interrupted {
            signal,
            step: saved_step,
            checkpoint: dir,
        })
    }

    /// Every `--save-every` steps, at the last step, and when a stop signal came: a checkpoint
    /// (after a signal, the run then ends).
    pub(super) fn checkpoint(&mut self, step: usize) -> Result<()> {
        let every = self.cfg.output.save_every;
        let last = step == self.cfg.steps;
        if !((every > 0 && step.is_multiple_of(every)) || last || signals::requested().is_some()) {
            return Ok(());
        }
        let dir = self.save(step, self.cursor())?;
        // Also a signal that came during the save: the run ends with this checkpoint.
        match signals::requested() {
            Some(signal) => {
                self.progress.finish();
                Err(Error::Interrupted {
                    signal,
                    step,
                    checkpoint: dir,
                })
            }
            None if !last => {
                self.progress.message(&format!(
                    "step {step}: checkpoint saved to {}",
                    dir.display()
                ));
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// `--reload-interval`: checkpoint, drop the model, adapter and optimizer, load the model
    /// again (the same load as at the start) and continue from the checkpoint.
    pub(super) fn reload(&mut self, step: usize) -> Result<()> {
        let clock = Instant::now();
        let dir = self.save(step, self.cursor())?;
        // A stop asked for meanwhile ends the run on this checkpoint, before a reload that
        // could take minutes.
        if let Some(signal) = signals::requested() {
            self.progress.finish();
            return Err(Error::Interrupted {
                signal,
                step,
                checkpoint: dir,
            });
        }
        memory::release_free();
        let before = memory::current_rss();
        self.engine.reload()?;
        let saved = checkpoint::load(&dir)?;
        let adapter = saved.adapter(self.engine.config())?;
        self.engine.set_adapter(adapter, Some(saved.optimizer))?;
        self.batcher
            .restore(saved.state.epoch, saved.state.position);
        memory::release_free();
        let after = memory::current_rss();
        self.progress.message(&format!(
            "step {step}: reloaded model, adapter and optimizer from {} ({:.2} GB resident before, {:.2} GB after)",
            dir.display(),
            before.map(memory::gb).unwrap_or(f64::NAN),
            after.map(memory::gb).unwrap_or(f64::NAN)
        ));
        self.metrics.write(
            json!({"type": "reload", "step": step, "rss_before_bytes": before,
            "rss_after_bytes": after, "seconds": clock.elapsed().as_secs_f64()}),
        )
    }
}

/// The adapter files (PEFT layout, and the run's `train_config.json`) written into a staged
/// directory that will take the place of `dest`.
fn stage_adapter(adapter: &Adapter, dest: &Path, config: &TrainConfig) -> Result<Staged> {
    let staged = Staged::replacing(dest)?;
    let tmp = &staged.tmp;
    std::fs::create_dir_all(tmp).map_err(|e| Error::io("create", tmp, e))?;
    adapter.save_peft(tmp, &config.model.model)?;
    let cfg = serde_json::to_string_pretty(config).unwrap_or_default();
    crate::io::write_synced(&tmp.join("train_config.json"), cfg.as_bytes())?;
    Ok(staged)
}

/// Writes an adapter directory (`best/`) atomically: the complete new directory replaces the
/// old one, so a reader sees one or the other, never a mix.
pub fn save_adapter_dir(adapter: &Adapter, dir: &Path, config: &TrainConfig) -> Result<()> {
    if let Some(parent) = dir.parent() {
        crate::io::clear_leftovers(parent);
    }
    stage_adapter(adapter, dir, config)?.commit()
}

/// Writes the adapter files into `dir`, which also holds metrics and other runs' outputs, as
/// one set: a crash while they are moved in is finished at the next start or load, never
/// left as a mix of two adapters.
pub fn save_adapter_files(adapter: &Adapter, dir: &Path, config: &TrainConfig) -> Result<()> {
    stage_adapter(adapter, &dir.join("adapter"), config)?.commit_files_into(dir)
}
