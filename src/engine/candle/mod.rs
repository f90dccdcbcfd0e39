//! The candle engine: the training step on candle tensors (the block-wise loop over
//! [`crate::model::block`], whose ops run the fused CPU kernels where they apply and candle's
//! composite ops elsewhere), the micro-batch layout and the optimizer.

pub mod batch;
pub mod optimizer;
pub mod preference;
pub mod step;

use super::objective::{Method, PreferenceLoss, PreferenceSums};
use super::{Engine, MicroBatchRows, OptimizerState, StepError};
use crate::data::batch::Row;
use crate::data::preference::Pair;
use crate::data::Sample;
use crate::error::{Error, Result};
use crate::infer::eval::EvalResult;
use crate::model::lora::Adapter;
use crate::model::{Llama, LoadOptions, ModelConfig};
use crate::runtime::memory::{self, Meter};
use candle_core::{Device, Tensor};
use optimizer::{clip_grad_norm, AdamW};
use std::time::Instant;
use step::{Grads, LossSums, Profile, Step};

/// The model (with the adapter being trained attached), its optimizer and the gradients of
/// the step in progress, on one candle device.
pub struct CandleEngine {
    /// The `--model` value and how it was loaded: a reload repeats exactly this.
    spec: String,
    load: LoadOptions,
    cfg: ModelConfig,
    /// None only inside [`Engine::reload`].
    model: Option<Llama>,
    opt: Option<AdamW>,
    grads: Option<Grads>,
    weight_decay: f64,
    keep_blocks: usize,
    meter: Meter,
}

impl CandleEngine {
    /// An engine over `model`, loaded from `spec` with `load` (a reload repeats that load).
    /// Its adapter comes with [`Engine::set_adapter`].
    pub fn new(
        model: Llama,
        spec: &str,
        load: LoadOptions,
        weight_decay: f64,
        keep_blocks: usize,
        meter: Meter,
    ) -> Self {
        Self {
            spec: spec.to_string(),
            load,
            cfg: model.cfg.clone(),
            model: Some(model),
            opt: None,
            grads: None,
            weight_decay,
            keep_blocks,
            meter,
        }
    }

    fn model(&self) -> Result<&Llama> {
        self.model.as_ref().ok_or_else(reloading)
    }

    fn device(&self) -> Result<Device> {
        Ok(self.model()?.device.clone())
    }
}

impl CandleEngine {
    /// Lays `batch` out as a micro-batch (timed as data) and runs `run` on the step of the
    /// model and its adapter, with the step's gradients.
    fn with_step<R>(
        &mut self,
        batch: &MicroBatchRows,
        profile: &mut Profile,
        run: impl FnOnce(
            &Step,
            &step::MicroBatch,
            &mut Grads,
            &mut Profile,
        ) -> std::result::Result<R, StepError>,
    ) -> std::result::Result<R, StepError> {
        let model = self.model.as_ref().ok_or_else(reloading)?;
        let adapter = attached(model)?;
        let grads = self.grads.get_or_insert_with(|| Grads::new(adapter));
        let clock = Instant::now();
        let refs: Vec<&Row> = batch.rows.iter().collect();
        let mut mb = batch::micro_batch(model, &refs)?;
        mb.dropout = batch.dropout;
        profile.data += clock.elapsed();
        let step = Step {
            model,
            adapter,
            keep_blocks: self.keep_blocks,
            meter: &self.meter,
        };
        run(&step, &mb, grads, profile)
    }
}

fn reloading() -> Error {
    Error::Usage("the model is being reloaded; it has no weights now".into())
}

fn no_adapter() -> Error {
    Error::Usage("no adapter is attached to the model".into())
}

/// The adapter `model` trains.
fn attached(model: &Llama) -> Result<&Adapter> {
    model.adapter.as_ref().ok_or_else(no_adapter)
}

fn to_host(ts: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(ts
        .iter()
        .map(|t| t.to_device(&Device::Cpu))
        .collect::<candle_core::Result<_>>()?)
}

impl Engine for CandleEngine {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn accumulate(
        &mut self,
        batch: &MicroBatchRows,
        profile: &mut Profile,
    ) -> std::result::Result<LossSums, StepError> {
        self.with_step(batch, profile, |step, mb, grads, profile| {
            step.forward_backward(mb, batch.loss_scale, grads, profile)
        })
    }

    fn accumulate_pairs(
        &mut self,
        batch: &MicroBatchRows,
        loss: &PreferenceLoss,
        profile: &mut Profile,
    ) -> std::result::Result<PreferenceSums, StepError> {
        self.with_step(batch, profile, |step, mb, grads, profile| {
            preference::accumulate(step, mb, loss, grads, profile)
        })
    }

    fn evaluate_pairs(
        &self,
        pairs: &[Pair],
        batch_size: usize,
        method: Method,
        beta: f64,
    ) -> Result<PreferenceSums> {
        preference::evaluate(self.model()?, pairs, batch_size, method, beta)
    }

    fn clip_gradients(&mut self, max_norm: f64) -> Result<f64> {
        let model = self.model.as_ref().ok_or_else(reloading)?;
        let adapter = attached(model)?;
        let grads = self.grads.get_or_insert_with(|| Grads::new(adapter));
        grads.fill_missing(adapter)?;
        Ok(clip_grad_norm(grads, max_norm)?)
    }

    fn update(&mut self, lr: f64) -> Result<()> {
        let grads = self.grads.take().ok_or_else(|| {
            Error::Usage("an update needs the step's gradients, and there are none".into())
        })?;
        let model = self.model.as_mut().ok_or_else(reloading)?;
        let adapter = model.adapter.as_mut().ok_or_else(no_adapter)?;
        let opt = self.opt.as_mut().ok_or_else(no_adapter)?;
        Ok(opt.step(adapter, &grads, lr)?)
    }

    fn discard_gradients(&mut self) {
        self.grads = None;
    }

    fn adapter(&self) -> Result<Adapter> {
        let a = attached(self.model()?)?;
        Ok(a.to_device(&Device::Cpu)?)
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        let s = self.opt.as_ref().ok_or_else(no_adapter)?.state();
        Ok(OptimizerState {
            t: s.t,
            m: to_host(&s.m)?,
            v: to_host(&s.v)?,
        })
    }

    fn set_adapter(&mut self, adapter: Adapter, optimizer: Option<OptimizerState>) -> Result<()> {
        let device = self.device()?;
        let mut adapter = adapter.to_device(&device)?;
        let mut opt = AdamW::new(&mut adapter, self.weight_decay)?;
        if let Some(s) = optimizer {
            let on = |ts: Vec<Tensor>| -> candle_core::Result<Vec<Tensor>> {
                ts.iter().map(|t| t.to_device(&device)).collect()
            };
            opt.set_state(OptimizerState {
                t: s.t,
                m: on(s.m)?,
                v: on(s.v)?,
            });
        }
        self.grads = None;
        self.opt = Some(opt);
        let model = self.model.as_mut().ok_or_else(reloading)?;
        model.adapter = Some(adapter);
        Ok(())
    }

    fn evaluate(&self, samples: &[Sample], batch_size: usize) -> Result<EvalResult> {
        crate::infer::eval::evaluate(self.model()?, samples, batch_size)
    }

    fn reload(&mut self) -> Result<()> {
        self.grads = None;
        self.opt = None;
        self.model = None;
        memory::release_free();
        self.model = Some(crate::model::load(&self.spec, &self.load, None)?.model);
        Ok(())
    }

    fn meter(&self) -> &Meter {
        &self.meter
    }
}
