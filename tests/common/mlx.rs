//! The MLX engine tests' shared parts: one MLX test at a time, the tiny Llama as MLX holds
//! it, both engines over a model, an adapter, rows, and a training loop through the seam.

use candle_core::{DType, Device, Tensor};
use mlx_rs::Dtype;
use std::sync::Mutex;
use your_ai::data::batch::Row;
use your_ai::data::Sample;
use your_ai::engine::candle::CandleEngine;
use your_ai::engine::mlx::MlxEngine;
use your_ai::engine::{Engine, MicroBatchRows, Profile};
use your_ai::model::lora::{Adapter, LoraConfig, Target};
use your_ai::model::quantized::QuantBits;
use your_ai::model::{load, LoadOptions};
use your_ai::runtime::memory::Meter;

/// MLX's allocator and limits are the process's: one MLX test at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny random Llama (two blocks, hidden 64, GQA, Llama 3.1 RoPE scaling, tied embeddings)
/// with SmolLM2's tokenizer, as the load function takes it.
pub fn tiny_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    super::tiny_chat_model(tmp.path());
    tmp
}

pub fn opts(dtype: DType, quantize: Option<QuantBits>) -> LoadOptions {
    LoadOptions::new(Device::Cpu, dtype, quantize)
}

/// The tiny Llama in `dir` as the MLX engine holds it in `dtype` (f32 or bf16), and an adapter
/// on both its blocks.
pub fn tiny_mlx(
    dir: &std::path::Path,
    dtype: DType,
) -> (your_ai::engine::mlx::weights::Model, Adapter) {
    let llama = load(dir.to_str().unwrap(), &opts(dtype, None), None)
        .unwrap()
        .model;
    let a = adapter(&llama.cfg, vec![0, 1]);
    let mlx = if dtype == DType::BF16 {
        Dtype::Bfloat16
    } else {
        Dtype::Float32
    };
    let model = your_ai::engine::mlx::weights::Model::from_llama(llama, mlx, None).unwrap();
    (model, a)
}

pub fn candle_engine(spec: &str, o: &LoadOptions) -> CandleEngine {
    let m = load(spec, o, None).unwrap().model;
    CandleEngine::new(m, spec, o.clone(), 0.01, 0, Meter::resident())
}

/// The MLX engine over `spec`, its top `keep` adapted blocks keeping their frozen products.
pub fn mlx_engine(spec: &str, o: &LoadOptions, keep: usize) -> MlxEngine {
    let m = load(spec, o, None).unwrap().model;
    MlxEngine::new(m, spec, o.clone(), (0.01, keep), 20_000_000_000, None).unwrap()
}

/// A LoRA adapter on `layers`, every target, from the trainer's initialisation (seed 7), with
/// B drawn too (B = 0 would leave every dA zero at the first step).
pub fn adapter(cfg: &your_ai::model::ModelConfig, layers: Vec<usize>) -> Adapter {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        layers,
        use_rslora: false,
    };
    let mut a = Adapter::init(lora, cfg, 7, &Device::Cpu).unwrap();
    for (i, t) in a.tensors_mut().enumerate() {
        if i % 2 == 1 {
            let n: usize = t.dims().iter().product();
            let v: Vec<f32> = (0..n)
                .map(|k| (((k * 37 + i * 101) % 97) as f32 / 97.0 - 0.5) * 0.1)
                .collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
    }
    a
}

/// `a` with pairs only on `targets` of block `layer` (the rest dropped): q and v and gate
/// leave k and up out of their joined linears, o and down without a pair.
pub fn partial(mut a: Adapter, layer: usize, targets: &[Target]) -> Adapter {
    for (l, pairs) in a.pairs.iter_mut().enumerate() {
        for t in Target::ALL {
            if l != layer || !targets.contains(&t) {
                pairs[t.index()] = None;
            }
        }
    }
    a.cfg.targets = targets.to_vec();
    a.cfg.layers = vec![layer];
    a
}

/// Rows of pseudo-random tokens (below `vocab`) of the given lengths, the second half of each
/// trained.
pub fn rows(vocab: u32, lens: &[usize], seed: u32) -> Vec<Row> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids: Vec<u32> = (0..n as u32)
                .map(|p| (p * 7919 + seed * 104_729 + i as u32 * 31) % (vocab - 3) + 3)
                .collect();
            let s = Sample {
                trained: (0..n).map(|p| p >= n / 2).collect(),
                ids,
                truncated: 0,
                untrained_turns: 0,
            };
            Row::single(&s, 1.0)
        })
        .collect()
}

/// `steps` optimizer steps of `engine` (from `adapter`), each on its own batch; the mean loss
/// of each.
pub fn train<E: Engine>(engine: &mut E, batches: &[Vec<Row>], lr: f64) -> Vec<f64> {
    let mut losses = vec![];
    for b in batches {
        let weight: f64 = b.iter().map(Row::scored_weight).sum();
        let targets: usize = b.iter().map(Row::scored).sum();
        let batch = MicroBatchRows {
            rows: b,
            dropout: None,
            loss_scale: 1.0 / weight,
        };
        let sums = engine.accumulate(&batch, &mut Profile::default()).unwrap();
        engine.clip_gradients(1.0).unwrap();
        engine.update(lr).unwrap();
        losses.push(sums.ce / targets as f64);
    }
    losses
}

pub fn assert_losses_match(what: &str, mlx: &[f64], candle: &[f64], rel: f64) {
    for (i, (a, b)) in mlx.iter().zip(candle).enumerate() {
        let d = (a - b).abs() / b.abs();
        assert!(
            d <= rel,
            "{what}: step {}: MLX {a} vs candle {b} ({d:.2e} relative)\nMLX {mlx:?}\ncandle {candle:?}",
            i + 1
        );
    }
}

/// `r`'s tokens as a sample.
pub fn sample(r: &Row) -> Sample {
    Sample {
        ids: r.ids.clone(),
        trained: r.trained.clone(),
        truncated: 0,
        untrained_turns: 0,
    }
}

/// Rows of `lens` documents packed into rows of at most `max_len` tokens (`--pack`): each row
/// holds several documents whose positions restart at 0.
pub fn packed_rows(vocab: u32, lens: &[usize], seed: u32, max_len: usize) -> Vec<Row> {
    let docs = rows(vocab, lens, seed);
    let samples: Vec<Sample> = docs.iter().map(sample).collect();
    let refs: Vec<&Sample> = samples.iter().collect();
    your_ai::data::batch::pack(&refs, &vec![1.0; refs.len()], max_len)
}
