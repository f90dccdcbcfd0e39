//! The MLX engine: the training step on MLX arrays through mlx-rs (Metal on Apple silicon; on
//! Linux MLX's CPU backend from the mlx-cpu wheel, which is what the tests here run on).
//!
//! The frozen weights are converted from the project's one load ([`weights`]); the adapter and
//! AdamW stay in f32 ([`params`], [`optimizer`]); the step is block-wise with recompute, MLX's
//! autograd differentiating one block at a time ([`step`], [`block`], [`head`]), evaluated a
//! block at a time; the allocator's cache is cleared after each micro-batch, so the process
//! does not grow by what a step freed. MLX's memory limits come from the run's
//! budget, and the meter reads MLX's active, peak and cache memory
//! ([`crate::runtime::memory::mlx`]).
//!
//! Built only with the `mlx` feature.

pub mod batch;
pub mod block;
pub mod blocks;
pub mod compiled;
pub mod convert;
pub mod device;
pub mod diagonal;
pub mod error;
pub mod graph;
pub mod head;
pub mod kept;
pub mod lowered;
pub mod optimizer;
pub mod params;
pub mod preference;
pub mod step;
pub mod weights;

#[cfg(test)]
mod checks;

pub use error::MlxError;

use super::objective::{evaluate_pairs, Method, PreferenceLoss, PreferenceSums};
use super::{Engine, LossSums, MicroBatchRows, OptimizerState, Profile, StepError};
use crate::data::batch::Row;
use crate::data::preference::Pair;
use crate::data::Sample;
use crate::error::{Error, Result};
use crate::infer::eval::EvalResult;
use crate::model::lora::Adapter;
use crate::model::{Llama, LoadOptions, ModelConfig};
use crate::runtime::memory::{self, Meter};
use candle_core::DType;
use mlx_rs::{Array, Dtype};
use optimizer::AdamW;
use params::Params;
use std::time::Instant;
use step::Evaluation;
use weights::Model;

/// The MLX dtype of a compute dtype.
pub fn mlx_dtype(d: DType) -> Result<Dtype> {
    match d {
        DType::F32 => Ok(Dtype::Float32),
        DType::BF16 => Ok(Dtype::Bfloat16),
        DType::F16 => Ok(Dtype::Float16),
        other => Err(Error::Usage(format!(
            "--dtype: the MLX engine computes in f32, bf16 or f16, not {other:?}"
        ))),
    }
}

/// The frozen model, the adapter and its optimizer, and the gradients of the step in
/// progress, as MLX arrays.
pub struct MlxEngine {
    /// The `--model` value and how it was loaded: a reload repeats exactly this.
    spec: String,
    load: LoadOptions,
    dtype: Dtype,
    bits: Option<i32>,
    cfg: ModelConfig,
    /// None only inside [`Engine::reload`].
    model: Option<Model>,
    params: Option<Params>,
    opt: Option<AdamW>,
    /// The step's gradient so far, laid out as [`Params::banks`].
    grads: Option<params::Banks>,
    /// The clipping factor of `grads` ([`Engine::clip_gradients`]), applied by the update.
    clip: f64,
    weight_decay: f64,
    /// Adapted blocks (the top ones) that keep their frozen products from the forward.
    keep_blocks: usize,
    meter: Meter,
}

impl From<mlx_rs::error::Exception> for Error {
    fn from(e: mlx_rs::error::Exception) -> Self {
        Error::Mlx(e.into())
    }
}

impl From<mlx_rs::error::Exception> for StepError {
    fn from(e: mlx_rs::error::Exception) -> Self {
        StepError::Failed(e.into())
    }
}

fn reloading() -> Error {
    Error::Usage("the model is being reloaded; it has no weights now".into())
}

fn no_adapter() -> Error {
    Error::Usage("no adapter is attached to the model".into())
}

/// Evaluates `arrays`, mapping MLX's failure.
fn eval<'a>(arrays: impl IntoIterator<Item = &'a Array>) -> Result<()> {
    Ok(mlx_rs::transforms::eval(arrays)?)
}

impl MlxEngine {
    /// An engine over `model` (loaded from `spec` with `load`, on the host), computing in
    /// `load.dtype`, its block linears quantized when `load.quantize` says so. MLX's memory
    /// and wired limits are set from `budget`, its cache limit to `cache` (the pre-flight's
    /// allowance; None: a share of the budget), and the meter is MLX's. The top `keep_blocks`
    /// adapted blocks keep their frozen products for the backward. Its adapter comes with
    /// [`Engine::set_adapter`].
    pub fn new(
        model: Llama,
        spec: &str,
        load: LoadOptions,
        (weight_decay, keep_blocks): (f64, usize),
        budget: u64,
        cache: Option<u64>,
    ) -> Result<Self> {
        let dtype = mlx_dtype(load.dtype)?;
        let bits = load.quantize.map(|q| q.bits() as i32);
        let limits = memory::mlx::apply_budget(budget, cache)?;
        eprintln!(
            "Set MLX memory limit to {:.2} GB (was {:.2} GB); cache limit {:.2} GB{}",
            memory::gb(limits.memory),
            memory::gb(limits.previous_memory),
            memory::gb(limits.cache),
            match limits.wired {
                Some(w) => format!(", wired limit {:.2} GB", memory::gb(w)),
                None => String::new(),
            }
        );
        let cfg = model.cfg.clone();
        // Evaluated as it converts, so the weights are resident before the first step.
        let converted = Model::from_llama(model, dtype, bits)?;
        memory::release_free();
        Ok(Self {
            spec: spec.to_string(),
            load,
            dtype,
            bits,
            cfg,
            model: Some(converted),
            params: None,
            opt: None,
            grads: None,
            clip: 1.0,
            weight_decay,
            keep_blocks,
            meter: Meter::mlx(),
        })
    }

    fn model(&self) -> Result<&Model> {
        self.model.as_ref().ok_or_else(reloading)
    }

    fn params(&self) -> Result<&Params> {
        self.params.as_ref().ok_or_else(no_adapter)
    }

    /// Bytes of frozen weights held.
    pub fn weight_bytes(&self) -> usize {
        self.model.as_ref().map_or(0, Model::bytes)
    }
}

impl MlxEngine {
    /// The model, the adapter and the micro-batch laid out (with its dropout), timed as data.
    fn prepare(
        &self,
        batch: &MicroBatchRows,
        profile: &mut Profile,
    ) -> Result<(&Model, &Params, batch::Layout)> {
        let model = self.model.as_ref().ok_or_else(reloading)?;
        let params = self.params.as_ref().ok_or_else(no_adapter)?;
        let clock = Instant::now();
        let mut lay = batch::layout(batch.rows, &model.cfg)?;
        lay.dropout = batch.dropout;
        profile.data += clock.elapsed();
        Ok((model, params, lay))
    }

    /// Adds a micro-batch's gradients into the accumulated ones and evaluates them with
    /// `outputs`: the micro-batch's last evaluation. The allocator's cache is cleared after it,
    /// so the process holds one step's working set at most, not what every shape seen so far
    /// left cached.
    fn add_gradients(&mut self, grads: &params::Banks, outputs: &[&Array]) -> Result<()> {
        let sum = match self.grads.take() {
            None => grads.clone(),
            Some([a, b]) => [a.add(&grads[0])?, b.add(&grads[1])?],
        };
        eval(outputs.iter().copied().chain(&sum))?;
        self.grads = Some(sum);
        self.clip = 1.0;
        memory::mlx::clear_cache()?;
        Ok(())
    }

    /// The budget check after each micro-batch.
    fn within_budget(&self) -> std::result::Result<(), StepError> {
        match self.meter.over_limit() {
            Some(peak) => Err(StepError::OverBudget { peak }),
            None => Ok(()),
        }
    }
}

impl Engine for MlxEngine {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn accumulate(
        &mut self,
        batch: &MicroBatchRows,
        profile: &mut Profile,
    ) -> std::result::Result<LossSums, StepError> {
        let (model, params, lay) = self.prepare(batch, profile)?;
        let pending = step::forward_backward(
            model,
            params,
            &lay,
            (batch.loss_scale, self.keep_blocks),
            Evaluation::standard(),
            profile,
        )?;
        let clock = Instant::now();
        self.add_gradients(&pending.grad, &[&pending.ce, &pending.weighted])?;
        let sums = pending.sums()?;
        drop(pending);
        profile.backward += clock.elapsed();
        self.within_budget()?;
        Ok(sums)
    }

    fn accumulate_pairs(
        &mut self,
        batch: &MicroBatchRows,
        loss: &PreferenceLoss,
        profile: &mut Profile,
    ) -> std::result::Result<PreferenceSums, StepError> {
        let (model, params, lay) = self.prepare(batch, profile)?;
        let clock = Instant::now();
        let (sums, grads) =
            preference::forward_backward(model, params, &lay, (loss, self.keep_blocks))?;
        self.add_gradients(&grads, &[])?;
        profile.forward += clock.elapsed();
        self.within_budget()?;
        Ok(sums)
    }

    fn evaluate_pairs(
        &self,
        pairs: &[Pair],
        batch_size: usize,
        method: Method,
        beta: f64,
    ) -> Result<PreferenceSums> {
        let (model, params) = (self.model()?, self.params()?);
        evaluate_pairs(pairs, batch_size, method, beta, |rows, reference| {
            let lay = batch::layout(rows, &model.cfg)?;
            let scores = preference::score_pairs(model, params, &lay, reference)?;
            memory::mlx::clear_cache()?;
            Ok(scores)
        })
    }

    fn clip_gradients(&mut self, max_norm: f64) -> Result<f64> {
        let grads = match self.grads.take() {
            Some(g) => g,
            None => {
                let [a, b] = &self.params()?.banks;
                [mlx_rs::ops::zeros_like(a)?, mlx_rs::ops::zeros_like(b)?]
            }
        };
        let norm = convert::scalar(&optimizer::global_norm(&grads)?)?;
        // Applied in the update's fused kernel.
        self.clip = optimizer::clip_factor(norm, max_norm);
        self.grads = Some(grads);
        Ok(norm)
    }

    fn update(&mut self, lr: f64) -> Result<()> {
        let grads = self.grads.take().ok_or_else(|| {
            Error::Usage("an update needs the step's gradients, and there are none".into())
        })?;
        let params = self.params.as_mut().ok_or_else(no_adapter)?;
        let opt = self.opt.as_mut().ok_or_else(no_adapter)?;
        let new = opt.step(
            &params.banks,
            &grads,
            std::mem::replace(&mut self.clip, 1.0),
            lr,
        )?;
        eval(new.iter().chain(&opt.m).chain(&opt.v))?;
        let banks: params::Banks = new
            .try_into()
            .map_err(|_| Error::Usage("AdamW returned other than two banks".into()))?;
        *params = params.with(banks)?;
        memory::mlx::clear_cache()?;
        Ok(())
    }

    fn discard_gradients(&mut self) {
        self.grads = None;
        self.clip = 1.0;
    }

    fn adapter(&self) -> Result<Adapter> {
        self.params()?.to_adapter()
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        let opt = self.opt.as_ref().ok_or_else(no_adapter)?;
        let params = self.params()?;
        // A tensor a moment, as the candle engine keeps them and checkpoints hold them.
        let host = |banks: &[Array]| {
            params
                .split(banks)?
                .iter()
                .map(convert::to_tensor)
                .collect::<Result<Vec<_>>>()
        };
        Ok(OptimizerState {
            t: opt.t,
            m: host(&opt.m)?,
            v: host(&opt.v)?,
        })
    }

    fn set_adapter(&mut self, adapter: Adapter, optimizer: Option<OptimizerState>) -> Result<()> {
        let params = Params::from_adapter(&adapter)?;
        let sizes = params.bank_sizes();
        let mut opt = AdamW::new(&sizes, self.weight_decay)?;
        if let Some(s) = optimizer {
            let on = |ts: &[candle_core::Tensor]| -> Result<Vec<Array>> {
                let arrays = ts
                    .iter()
                    .map(|t| convert::to_array(t, Dtype::Float32))
                    .collect::<Result<Vec<_>>>()?;
                let held: Vec<&[i32]> = arrays.iter().map(Array::shape).collect();
                let want: Vec<&[i32]> = params.shapes().iter().map(|s| &s[..]).collect();
                if held != want {
                    return Err(Error::Usage(format!(
                        "the optimizer state's moments ({} tensors) do not match the adapter's \
                         {} tensors in shape and order: the checkpoint is of another adapter",
                        held.len(),
                        want.len()
                    )));
                }
                Ok(params::join(&arrays)?.to_vec())
            };
            opt.t = s.t;
            opt.m = on(&s.m)?;
            opt.v = on(&s.v)?;
        }
        eval(params.banks.iter().chain(&opt.m).chain(&opt.v))?;
        self.grads = None;
        self.params = Some(params);
        self.opt = Some(opt);
        Ok(())
    }

    fn evaluate(&self, samples: &[Sample], batch_size: usize) -> Result<EvalResult> {
        let model = self.model()?;
        let params = self.params()?;
        let mut total = 0f64;
        let mut tokens = 0usize;
        for chunk in samples.chunks(batch_size.max(1)) {
            let rows: Vec<Row> = chunk.iter().map(|s| Row::single(s, 1.0)).collect();
            let lay = batch::layout(&rows, &model.cfg)?;
            let (sum, n) = eval_loss(model, params, &lay)?;
            total += sum;
            tokens += n;
            memory::mlx::clear_cache()?;
        }
        Ok(EvalResult {
            loss: if tokens > 0 {
                total / tokens as f64
            } else {
                f64::NAN
            },
            tokens,
            examples: samples.len(),
        })
    }

    fn reload(&mut self) -> Result<()> {
        self.grads = None;
        self.opt = None;
        self.params = None;
        self.model = None;
        memory::mlx::clear_cache()?;
        memory::release_free();
        let loaded = crate::model::load(&self.spec, &self.load, None)?.model;
        self.model = Some(Model::from_llama(loaded, self.dtype, self.bits)?);
        Ok(())
    }

    fn meter(&self) -> &Meter {
        &self.meter
    }
}

/// Σ cross-entropy over `lay`'s scored rows, and their number (no gradients).
fn eval_loss(model: &Model, params: &Params, lay: &batch::Layout) -> Result<(f64, usize)> {
    let n = lay.target_rows.len();
    if n == 0 {
        return Ok((0.0, 0));
    }
    let params = step::lowered(model, params)?;
    let (x, _) = step::forward(model, Some(&params), lay, 0, Evaluation::standard())?;
    let ce = step::row_ce(model, &x, lay, Evaluation::standard())?.sum(None)?;
    Ok((convert::scalar(&ce)?, n))
}
