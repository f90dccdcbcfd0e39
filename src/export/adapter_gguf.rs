//! A LoRA adapter as a GGUF in the form llama.cpp's `--lora` loads: `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, and per adapted weight `<name>.lora_a` (`[r, in]`)
//! and `<name>.lora_b` (`[out, r]`) under llama.cpp tensor names. llama.cpp's q/k weights have
//! their rows permuted, `W' = P W`, so `P (B A) = (P B) A`: lora_b rows of q and k get the same
//! permutation and lora_a is unchanged. llama.cpp scales by alpha / r, so rsLoRA's α/√r is
//! carried as alpha' = α·√r.

use super::gguf_stream::TensorPlan;
use super::gguf_writer::gguf_arch;
use crate::error::{Error, Result};
use crate::model::lora::{Adapter, LoraConfig, LoraPair, Target};
use crate::model::ModelConfig;
use crate::weights::gguf::{hf_to_gguf_name, permute_qk, unpermute_qk};
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The llama.cpp name of the base weight a pair adapts: `blk.3.attn_q.weight`.
fn weight_name(layer: usize, t: Target) -> Result<String> {
    let hf = format!("model.layers.{layer}.{}.weight", t.path());
    hf_to_gguf_name(&hf).ok_or_else(|| Error::Export(format!("no GGUF name for {hf}")))
}

/// Rows of `b` permuted as llama.cpp permutes the weight it adapts (llama q/k only).
fn permute_heads(model: &ModelConfig, t: Target) -> Option<usize> {
    let (_, permuted) = gguf_arch(model.architecture);
    match t {
        Target::Q if permuted => Some(model.num_attention_heads),
        Target::K if permuted => Some(model.num_key_value_heads),
        _ => None,
    }
}

/// Refuses an adapter whose update `scale·B·A` is astronomically large, as `fuse` refuses to
/// merge it: the sum of its magnitudes, bounded by `scale·Σ_k (Σ_i |B_ik|)·(Σ_j |A_kj|)`, past
/// f32's range (llama.cpp would apply infinities).
fn check_range(a: &Tensor, b: &Tensor, scale: f64, alpha: f64, name: &str) -> Result<()> {
    let sums = |t: &Tensor, dim: usize| -> candle_core::Result<Vec<f32>> {
        t.abs()?.sum(dim)?.to_vec1::<f32>()
    };
    let err = |e| super::tensor_err(&format!("adapter tensor for {name}"), e);
    // A: [r, in], summed over its columns; B: [out, r], over its rows.
    let (rows_a, cols_b) = (sums(a, 1).map_err(err)?, sums(b, 0).map_err(err)?);
    let bound: f64 = rows_a
        .iter()
        .zip(&cols_b)
        .map(|(&x, &y)| scale.abs() * x as f64 * y as f64)
        .sum();
    if (alpha as f32).is_finite() && bound <= f32::MAX as f64 {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "the adapter's update of {name} overflows (infinite, NaN or astronomical values; its \
         scale, lora_alpha / r, is {scale}); check its adapter_config.json"
    )))
}

/// Writes `adapter` (for a model with config `model`) to `path` (a new file).
pub fn write(adapter: &Adapter, model: &ModelConfig, base_name: &str, path: &Path) -> Result<()> {
    let (arch, _) = gguf_arch(model.architecture);
    // llama.cpp computes the scale as alpha / r from these two numbers.
    let alpha = adapter.cfg.scale() * adapter.cfg.rank as f64;
    let meta: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), GValue::String(arch.into())),
        ("general.type".into(), GValue::String("adapter".into())),
        (
            "general.name".into(),
            GValue::String(format!(
                "{} LoRA",
                super::gguf_writer::model_name(base_name)
            )),
        ),
        ("adapter.type".into(), GValue::String("lora".into())),
        ("adapter.lora.alpha".into(), GValue::F32(alpha as f32)),
    ];
    let mut tensors: Vec<(String, QTensor)> = vec![];
    for (layer, t, p) in adapter.iter() {
        let name = weight_name(layer, t)?;
        let err = |e| super::tensor_err(&format!("adapter tensor for {name}"), e);
        let mut b = p.b.to_dtype(DType::F32).map_err(err)?;
        if let Some(h) = permute_heads(model, t) {
            b = permute_qk(&b, h).map_err(err)?;
        }
        let a = p.a.to_dtype(DType::F32).map_err(err)?;
        check_range(&a, &b, adapter.cfg.scale(), alpha, &name)?;
        tensors.push((
            format!("{name}.lora_a"),
            QTensor::quantize(&a, GgmlDType::F32).map_err(err)?,
        ));
        tensors.push((
            format!("{name}.lora_b"),
            QTensor::quantize(&b, GgmlDType::F32).map_err(err)?,
        ));
    }
    let plan: Vec<TensorPlan> = tensors
        .iter()
        .map(|(name, q)| TensorPlan {
            name: name.clone(),
            dims: q.shape().dims().to_vec(),
            dtype: q.dtype(),
        })
        .collect();
    let mut tensors: Vec<Option<QTensor>> = tensors.into_iter().map(|(_, q)| Some(q)).collect();
    let file = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
    let mut w = std::io::BufWriter::new(file);
    super::gguf_stream::write(&mut w, &meta, &plan, |i| {
        tensors[i]
            .take()
            .ok_or_else(|| Error::Export(format!("tensor {} asked for twice", plan[i].name)))
    })
    .map_err(|e| Error::Export(format!("{}: {e}", path.display())))?;
    std::io::Write::flush(&mut w).map_err(|e| Error::io("write", path, e))
}

/// Reads an adapter GGUF back (undoing the q/k permutation) for a model with config `model`.
/// The scale comes back as alpha / r, so the result is applied exactly as llama.cpp applies it.
pub fn read(path: &Path, model: &ModelConfig) -> Result<Adapter> {
    let bad = |reason: String| Error::Export(format!("{}: {reason}", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let content = Content::read(&mut f).map_err(|e| bad(format!("not a GGUF file: {e}")))?;
    let meta_str = |k: &str| match content.metadata.get(k) {
        Some(GValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    if meta_str("general.type") != Some("adapter") || meta_str("adapter.type") != Some("lora") {
        return Err(bad(
            "not a LoRA adapter GGUF (general.type / adapter.type)".into()
        ));
    }
    let alpha = match content.metadata.get("adapter.lora.alpha") {
        Some(v) => v.to_f32().map_err(|e| bad(e.to_string()))? as f64,
        None => return Err(bad("adapter.lora.alpha is missing".into())),
    };
    let mut pairs: Vec<[Option<LoraPair>; 7]> = (0..model.num_hidden_layers)
        .map(|_| Default::default())
        .collect();
    let (mut rank, mut targets, mut layers) = (0usize, vec![], vec![]);
    for (layer, slots) in pairs.iter_mut().enumerate() {
        for t in Target::ALL {
            let name = weight_name(layer, t)?;
            let (an, bn) = (format!("{name}.lora_a"), format!("{name}.lora_b"));
            if !content.tensor_infos.contains_key(&an) {
                continue;
            }
            let get = |n: &str| -> Result<Tensor> {
                let info = content
                    .tensor_infos
                    .get(n)
                    .ok_or_else(|| bad(format!("tensor {n} is missing")))?;
                info.read(
                    &mut f.try_clone().map_err(|e| Error::io("read", path, e))?,
                    content.tensor_data_offset,
                    &Device::Cpu,
                )
                .and_then(|q| q.dequantize(&Device::Cpu))
                .map_err(|e| bad(format!("tensor {n}: {e}")))
            };
            let a = get(&an)?;
            let mut b = get(&bn)?;
            if let Some(h) = permute_heads(model, t) {
                b = unpermute_qk(&b, h).map_err(|e| bad(e.to_string()))?;
            }
            rank = a.dim(0).map_err(|e| bad(e.to_string()))?;
            if !targets.contains(&t) {
                targets.push(t);
            }
            if layers.last() != Some(&layer) {
                layers.push(layer);
            }
            slots[t.index()] = Some(LoraPair { a, b });
        }
    }
    if rank == 0 {
        return Err(bad("no LoRA tensors for this model".into()));
    }
    targets.sort();
    Ok(Adapter {
        cfg: LoraConfig {
            rank,
            alpha,
            dropout: 0.0,
            targets,
            layers,
            use_rslora: false,
        },
        pairs,
    })
}
