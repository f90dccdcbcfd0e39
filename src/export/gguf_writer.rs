//! A merged model as one GGUF file in llama.cpp's layout: architecture hyper-parameters under
//! `<arch>.*`, the tokenizer under `tokenizer.*`, llama.cpp tensor names, q/k rows permuted for
//! llama.cpp's RoPE (llama architecture), 2-D weights in the chosen type and norms in F32.

use super::gguf_stream::{self, TensorPlan};
use super::merge::Base;
use super::{gguf_tokenizer, GgufType};
use crate::error::{Error, Result};
use crate::model::config::{Architecture, RopeScaling};
use crate::model::lora::Adapter;
use crate::weights::gguf::{hf_to_gguf_name, permute_qk};
use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The GGUF architecture name for the base, and whether its q/k rows are permuted.
pub fn gguf_arch(a: Architecture) -> (&'static str, bool) {
    match a {
        // llama.cpp runs Mistral checkpoints as `llama` (its converter does the same).
        Architecture::Llama | Architecture::Mistral => ("llama", true),
        Architecture::Qwen2 => ("qwen2", false),
    }
}

/// llama.cpp's `general.file_type` code for the export type.
fn file_type(t: GgufType) -> u32 {
    match t {
        GgufType::F32 => 0,
        GgufType::F16 => 1,
        GgufType::Q4_0 => 2,
        GgufType::Q8_0 => 7,
        GgufType::Q4KM => 15,
        GgufType::Bf16 => 32,
    }
}

/// Whether block `layer` of `n` gets the larger type in a `_M` k-quant mix (llama.cpp gives
/// the first and last eighth of the blocks, and every third one between, more bits).
fn more_bits(layer: usize, n: usize) -> bool {
    layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2
}

/// The GGML type of one tensor. K-quants need rows that are a multiple of 256; where they are
/// not, the nearest 32-block type stands in (Q4_K → Q5_0, Q6_K → Q8_0), as llama.cpp does.
pub fn tensor_type(
    t: GgufType,
    gguf_name: &str,
    shape: &[usize],
    n_layers: usize,
    tied: bool,
) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let row = shape[shape.len() - 1];
    let wanted = match t {
        GgufType::F32 => GgmlDType::F32,
        GgufType::F16 => GgmlDType::F16,
        GgufType::Bf16 => GgmlDType::BF16,
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4_0 => GgmlDType::Q4_0,
        GgufType::Q4KM => {
            let layer = gguf_name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok());
            let is_head =
                gguf_name == "output.weight" || (tied && gguf_name == "token_embd.weight");
            let mixed = gguf_name.contains(".attn_v.") || gguf_name.contains(".ffn_down.");
            if is_head || (mixed && layer.is_some_and(|l| more_bits(l, n_layers))) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    let fits = |d: GgmlDType| row.is_multiple_of(d.block_size());
    if fits(wanted) {
        return wanted;
    }
    let fallback = match wanted {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if fits(fallback) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// The base GGUF's metadata a fused GGUF keeps (llama.cpp's `general.*` naming and licence
/// keys).
const PROVENANCE: &[&str] = &[
    "general.organization",
    "general.author",
    "general.basename",
    "general.size_label",
    "general.license",
    "general.license.name",
    "general.license.link",
    "general.languages",
    "general.tags",
    "general.url",
    "general.repo_url",
    "general.source.url",
    "general.source.repo_url",
];

/// Writes the merged model to `path` (a new file).
pub fn write(base: &Base, adapter: &Adapter, path: &Path, qtype: GgufType) -> Result<()> {
    let c = &base.cfg;
    let (arch, permute) = gguf_arch(c.architecture);
    let mut meta: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), GValue::String(arch.into())),
        (
            "general.name".into(),
            GValue::String(model_name(&base.spec)),
        ),
        ("general.type".into(), GValue::String("model".into())),
        ("general.file_type".into(), GValue::U32(file_type(qtype))),
        ("general.quantization_version".into(), GValue::U32(2)),
    ];
    // Where the model comes from and on what terms, as a GGUF base says: a fused model is a
    // derivative of it (its own name and finetune are new).
    if let crate::weights::WeightStore::Gguf(g) = &base.store {
        for key in PROVENANCE {
            if let Some(v) = g.metadata(key) {
                meta.push((key.to_string(), v.clone()));
            }
        }
    }
    let u = |v: usize| GValue::U32(v as u32);
    for (k, v) in [
        ("context_length", u(c.max_position_embeddings)),
        ("embedding_length", u(c.hidden_size)),
        ("block_count", u(c.num_hidden_layers)),
        ("feed_forward_length", u(c.intermediate_size)),
        ("attention.head_count", u(c.num_attention_heads)),
        ("attention.head_count_kv", u(c.num_key_value_heads)),
        ("attention.key_length", u(c.head_dim)),
        ("attention.value_length", u(c.head_dim)),
        ("rope.dimension_count", u(c.head_dim)),
        ("rope.freq_base", GValue::F32(c.rope_theta as f32)),
        (
            "attention.layer_norm_rms_epsilon",
            GValue::F32(c.rms_norm_eps as f32),
        ),
        ("vocab_size", u(c.vocab_size)),
    ] {
        meta.push((format!("{arch}.{k}"), v));
    }
    if let Some(RopeScaling::Linear { factor }) = &c.rope_scaling {
        meta.push((
            format!("{arch}.rope.scaling.type"),
            GValue::String("linear".into()),
        ));
        meta.push((
            format!("{arch}.rope.scaling.factor"),
            GValue::F32(*factor as f32),
        ));
    }
    meta.extend(gguf_tokenizer::metadata(base)?);

    // The plan first (names, shapes, types), then each tensor merged, converted and written
    // in turn: one merged tensor in memory at a time.
    let mut plan = vec![];
    let mut sources = vec![];
    for (name, shape) in base.tensor_plan() {
        let gname = hf_to_gguf_name(&name)
            .ok_or_else(|| Error::Export(format!("tensor {name} has no GGUF name")))?;
        let dtype = tensor_type(
            qtype,
            &gname,
            &shape,
            c.num_hidden_layers,
            !base.has_lm_head(),
        );
        plan.push(TensorPlan {
            name: gname,
            dims: shape.clone(),
            dtype,
        });
        sources.push(Some((name, shape)));
    }
    let rope = rope_freqs(c)?;
    if let Some(rf) = &rope {
        plan.push(TensorPlan {
            name: "rope_freqs.weight".into(),
            dims: rf.shape().dims().to_vec(),
            dtype: rf.dtype(),
        });
        sources.push(None);
    }
    let mut rope = rope;
    let file = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
    let mut w = std::io::BufWriter::new(file);
    gguf_stream::write(&mut w, &meta, &plan, |i| {
        let Some((name, shape)) = &sources[i] else {
            return rope
                .take()
                .ok_or_else(|| Error::Export("rope_freqs.weight asked for twice".into()));
        };
        let mut t = base.merged(adapter, name, shape)?;
        let heads = if !permute {
            None
        } else if name.contains("self_attn.q_proj.") {
            Some(c.num_attention_heads)
        } else if name.contains("self_attn.k_proj.") {
            Some(c.num_key_value_heads)
        } else {
            None
        };
        if let Some(h) = heads {
            t = permute_qk(&t, h)
                .map_err(|e| super::tensor_err(&format!("permuting {name}"), e))?;
        }
        let ty = plan[i].dtype;
        QTensor::quantize(&t, ty)
            .map_err(|e| super::tensor_err(&format!("converting {name} to {ty:?}"), e))
    })
    .map_err(|e| match e {
        // A stop, or a refusal: they keep their own exit status.
        e @ (Error::Stopping { .. } | Error::Usage(_)) => e,
        e => Error::Export(format!("{}: {e}", path.display())),
    })?;
    std::io::Write::flush(&mut w).map_err(|e| Error::io("write", path, e))
}

/// Llama 3.1 style scaling is carried as per-frequency divisors in `rope_freqs.weight`.
fn rope_freqs(c: &crate::model::ModelConfig) -> Result<Option<QTensor>> {
    let factors: Vec<f32> = match &c.rope_scaling {
        Some(RopeScaling::Factors(f)) => f.clone(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let d = c.head_dim;
            let old = *original_max_position_embeddings as f64;
            let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
            (0..d / 2)
                .map(|i| {
                    let freq = 1.0 / c.rope_theta.powf((2 * i) as f64 / d as f64);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let divisor = if wavelen < high_wl {
                        1.0
                    } else if wavelen > low_wl {
                        *factor
                    } else {
                        let s = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        1.0 / ((1.0 - s) / factor + s)
                    };
                    divisor as f32
                })
                .collect()
        }
        _ => return Ok(None),
    };
    let n = factors.len();
    let t = Tensor::from_vec(factors, n, &Device::Cpu)
        .and_then(|t| QTensor::quantize(&t, GgmlDType::F32))
        .map_err(|e| super::tensor_err("rope_freqs", e))?;
    Ok(Some(t))
}

/// A model's name from how it was given (a path, an alias, a repository id): its last part,
/// never the local folders above it, and without a GGUF file's quantization suffix
/// (`-Q4_1`, `.Q4_K_M`, `-f16`), which the written file's own type replaces.
pub(crate) fn model_name(spec: &str) -> String {
    let s = spec.trim_end_matches('/');
    let s = s.rsplit('/').next().unwrap_or(s);
    let Some(stem) = s.strip_suffix(".gguf") else {
        return s.to_string();
    };
    let quant = regex::Regex::new(r"(?i)[-._](I?Q[1-8](_[0-9A-Z]+)*|BF16|F16|F32)$")
        .expect("a valid pattern");
    match quant.find(stem) {
        Some(m) if m.start() > 0 => stem[..m.start()].to_string(),
        _ => stem.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_the_last_part_without_a_quantization_suffix() {
        for (spec, name) in [
            (
                "/models/SmolLM2-135M-Instruct-Q4_1.gguf",
                "SmolLM2-135M-Instruct",
            ),
            (
                "Meta-Llama-3.1-8B-Instruct.Q4_K_M.gguf",
                "Meta-Llama-3.1-8B-Instruct",
            ),
            ("llama-3-8b-instruct-iq4_xs.gguf", "llama-3-8b-instruct"),
            ("tiny-f16.gguf", "tiny"),
            ("Q8_0.gguf", "Q8_0"),
            ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
            ("runs/merged/", "merged"),
            ("llama-8b", "llama-8b"),
            // Not a quantization: a size and a version stay.
            ("Qwen2.5-7B.gguf", "Qwen2.5-7B"),
            ("model-v2.gguf", "model-v2"),
        ] {
            assert_eq!(model_name(spec), name, "{spec}");
        }
    }

    #[test]
    fn q4_k_m_mix_and_fallbacks() {
        let t = |n: &str, shape: &[usize]| tensor_type(GgufType::Q4KM, n, shape, 32, false);
        assert_eq!(t("output.weight", &[1000, 4096]), GgmlDType::Q6K);
        assert_eq!(t("blk.0.attn_v.weight", &[1024, 4096]), GgmlDType::Q6K);
        assert_eq!(t("blk.5.attn_v.weight", &[1024, 4096]), GgmlDType::Q4K);
        assert_eq!(t("blk.6.ffn_down.weight", &[4096, 14336]), GgmlDType::Q6K);
        assert_eq!(t("blk.31.ffn_down.weight", &[4096, 14336]), GgmlDType::Q6K);
        assert_eq!(t("blk.3.attn_q.weight", &[4096, 4096]), GgmlDType::Q4K);
        // SmolLM2's 576-wide rows do not fit 256-blocks.
        assert_eq!(t("blk.3.attn_q.weight", &[576, 576]), GgmlDType::Q5_0);
        assert_eq!(t("blk.0.attn_v.weight", &[192, 576]), GgmlDType::Q8_0);
        assert_eq!(t("blk.0.attn_norm.weight", &[576]), GgmlDType::F32);
        assert_eq!(
            tensor_type(GgufType::Q8_0, "blk.0.attn_q.weight", &[8, 40], 2, false),
            GgmlDType::F16
        );
    }
}
