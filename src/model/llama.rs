//! The Llama-family model's weights (also Mistral and Qwen2) and how they are loaded: the
//! linears, the blocks, embeddings and head, and the KV cache inference keeps. The maths is
//! elsewhere: the block in `model/block.rs` (which also holds the inference pass), each op in
//! `model/ops/`.

use super::config::ModelConfig;
use super::quantized::{self, QuantBits, Weight};
use super::rope::Rope;
use super::sliced::{linear_slice_rows, QuantizedRows};
use super::vocab::{VocabMatrix, SLICE_ROWS};
use crate::model::lora::Adapter;
use crate::weights::{WeightStore, WeightsError};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// A linear layer `y = x Wᵀ (+ b)` with `W` stored `[out, in]` as in the checkpoints, dense or
/// quantized (see [`Weight`]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.dims2().map(|d| d.1).unwrap_or(0)
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims2().map(|d| d.0).unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_norm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_norm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Block {
    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

/// One block weight kept quantized: a GGUF tensor that is already quantized stays in its own
/// format (q/k rows un-permuted byte-wise, without dequantizing); anything else is loaded dense
/// one tensor at a time and quantized to `bits`. Rows that do not fill whole blocks stay dense.
fn load_quantized(
    store: &WeightStore,
    cfg: &ModelConfig,
    name: &str,
    shape: &[usize],
    bits: QuantBits,
    dtype: DType,
    device: &Device,
) -> std::result::Result<Weight, WeightsError> {
    let read_err = read_error(store, name);
    if let Some((q, arch)) = stored_quantized(store, name, shape)? {
        let heads = match arch.as_str() {
            "llama" if name.contains("self_attn.q_proj.") => Some(cfg.num_attention_heads),
            "llama" if name.contains("self_attn.k_proj.") => Some(cfg.num_key_value_heads),
            _ => None,
        };
        let q = match heads {
            Some(h) => quantized::permute_rows(
                &q,
                &quantized::unpermute_qk_rows(shape[0], h),
                &Device::Cpu,
            )
            .map_err(&read_err)?,
            None => q,
        };
        tracing::debug!("{name}: kept as stored ({:?})", q.dtype());
        return Weight::from_qtensor(&q, device).map_err(read_err);
    }
    let slice = linear_slice_rows(shape[1]);
    match quantize_from_store(store, name, shape, bits.ggml(), slice, device)? {
        Some(q) => Ok(Weight::Quantized(Arc::new(q))),
        None => Ok(Weight::Dense(store.get(name, shape, dtype, device)?)),
    }
}

/// Quantizes the `[rows, cols]` tensor `name` to `dt` straight from the file, reading one
/// slice of `slice_rows` rows at a time: the load never holds the whole matrix in f32 (2.1 GB
/// for Llama-8B's embeddings), only the slice in flight. `None` when its rows do not fill whole
/// blocks.
fn quantize_from_store(
    store: &WeightStore,
    name: &str,
    shape: &[usize],
    dt: GgmlDType,
    slice_rows: usize,
    device: &Device,
) -> std::result::Result<Option<QuantizedRows>, WeightsError> {
    enum Failed {
        Read(WeightsError),
        Quantize(candle_core::Error),
    }
    impl From<candle_core::Error> for Failed {
        fn from(e: candle_core::Error) -> Self {
            Failed::Quantize(e)
        }
    }
    let &[rows, cols] = shape else {
        return Err(read_error(store, name)(candle_core::Error::Msg(format!(
            "expected a matrix, got shape {shape:?}"
        ))));
    };
    QuantizedRows::quantize_rows(rows, cols, dt, slice_rows, device, |s0, n| {
        store
            .get_rows(name, shape, s0..s0 + n, DType::F32, &Device::Cpu)
            .map_err(Failed::Read)
    })
    .map_err(|e| match e {
        Failed::Read(e) => e,
        Failed::Quantize(e) => read_error(store, name)(e),
    })
}

/// The error for a failure to read or convert tensor `name` of `store`.
fn read_error<'a>(
    store: &'a WeightStore,
    name: &'a str,
) -> impl Fn(candle_core::Error) -> WeightsError + 'a {
    move |e| WeightsError::Read {
        tensor: name.to_string(),
        file: store.describe(),
        reason: e.to_string(),
    }
}

/// Tensor `name` (a Hugging Face name) as a GGUF stores it, on the CPU, when the store is a
/// GGUF that holds it quantized in whole blocks per row, with the GGUF's architecture; `None`
/// otherwise (not a GGUF, or stored as f32/f16/bf16).
fn stored_quantized(
    store: &WeightStore,
    name: &str,
    shape: &[usize],
) -> std::result::Result<Option<(QTensor, String)>, WeightsError> {
    let WeightStore::Gguf(g) = store else {
        return Ok(None);
    };
    let gname = crate::weights::gguf::hf_to_gguf_name(name).unwrap_or_default();
    let stored = g.content.tensor_infos.get(&gname).map(|i| i.ggml_dtype);
    if !stored.is_some_and(|d| !matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)) {
        return Ok(None);
    }
    let q = g.qtensor(&gname, &Device::Cpu)?;
    crate::weights::check_shape(&gname, &store.describe(), shape, q.shape().dims())?;
    let cols = q.shape().dims().last().copied().unwrap_or(0);
    if !cols.is_multiple_of(q.dtype().block_size()) {
        return Ok(None);
    }
    Ok(Some((q, g.architecture().to_string())))
}

/// An embedding or head matrix `[vocab, hidden]`: dense in `dtype` without `format`; with it,
/// a quantized GGUF tensor kept as stored, anything else quantized to `format`.
fn load_vocab(
    store: &WeightStore,
    name: &str,
    cfg: &ModelConfig,
    format: Option<GgmlDType>,
    dtype: DType,
    device: &Device,
) -> std::result::Result<VocabMatrix, WeightsError> {
    let shape = [cfg.vocab_size, cfg.hidden_size];
    let read_err = read_error(store, name);
    let Some(format) = format else {
        return Ok(VocabMatrix::Dense(store.get(name, &shape, dtype, device)?));
    };
    if let Some((q, _)) = stored_quantized(store, name, &shape)? {
        return VocabMatrix::from_quantized(&q, SLICE_ROWS, device).map_err(read_err);
    }
    match quantize_from_store(store, name, &shape, format, SLICE_ROWS, device)? {
        Some(q) => Ok(VocabMatrix::Quantized(Arc::new(q))),
        None => Ok(VocabMatrix::Dense(store.get(name, &shape, dtype, device)?)),
    }
}

/// Keys and values of every block for the positions seen so far.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<KvSlot>>,
    /// Generation: quantized weights are read from their blocks, activations rounded to 8
    /// bits ([`KvCache::for_decoding`]); otherwise every product is exact.
    decoding: bool,
    /// The dtype keys and values are held in; `None`: as computed.
    store: Option<DType>,
}

/// One block's keys and values: buffers `[b, nkv, capacity, d]` of which the first `len`
/// positions are filled. New positions are written in place, and the buffers grow by doubling,
/// so a token costs its own keys and values, not a copy of all the earlier ones.
#[derive(Debug)]
pub struct KvSlot {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvSlot {
    /// The key and value buffers `[b, nkv, capacity, d]` and the positions filled.
    pub(crate) fn buffers(&self) -> (&Tensor, &Tensor, usize) {
        (&self.k, &self.v, self.len)
    }

    /// Appends `k` and `v` (`[b, nkv, t, d]`), held in `store` (`None`: k's dtype), and
    /// returns every position's keys and values (views of the buffers, in that dtype).
    pub(crate) fn append(
        slot: &mut Option<Self>,
        k: &Tensor,
        v: &Tensor,
        store: Option<DType>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, nkv, t, d) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |s| s.len);
        let cap = slot.as_ref().map_or(0, |s| s.k.dim(2).unwrap_or(0));
        let dtype = slot
            .as_ref()
            .map_or(store.unwrap_or(k.dtype()), |s| s.k.dtype());
        if len + t > cap {
            let cap = (len + t).max(2 * cap).max(64);
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, nkv, cap, d), dtype, k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            *slot = Some(KvSlot {
                k: grow(slot.as_ref().map(|s| &s.k))?,
                v: grow(slot.as_ref().map(|s| &s.v))?,
                len,
            });
        }
        let s = slot.as_mut().expect("made above");
        s.k.slice_set(&k.to_dtype(dtype)?.contiguous()?, 2, len)?;
        s.v.slice_set(&v.to_dtype(dtype)?.contiguous()?, 2, len)?;
        s.len = len + t;
        Ok((s.k.narrow(2, 0, s.len)?, s.v.narrow(2, 0, s.len)?))
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            decoding: false,
            store: None,
        }
    }

    /// This cache holding keys and values in `store` (`None`: as computed). Generation on
    /// the CPU holds them in f16, as llama.cpp does: half the memory, and half the bytes
    /// each new token's attention reads.
    pub fn holding(self, store: Option<DType>) -> Self {
        Self { store, ..self }
    }

    /// The dtype keys and values are held in (`None`: as computed).
    pub fn store(&self) -> Option<DType> {
        self.store
    }

    /// A cache for generation: the model's quantized weights are read from their blocks with
    /// activations rounded to 8 bits, as llama.cpp does (`kernels::qmatvec`).
    pub fn for_decoding(num_layers: usize) -> Self {
        Self {
            decoding: true,
            ..Self::new(num_layers)
        }
    }

    pub fn decoding(&self) -> bool {
        self.decoding
    }

    /// Each block's keys and values, for a model of `num_layers` blocks (a cache made for
    /// another model starts empty).
    pub(crate) fn slots(&mut self, num_layers: usize) -> &mut [Option<KvSlot>] {
        if self.layers.len() != num_layers {
            *self = KvCache {
                decoding: self.decoding,
                store: self.store,
                ..KvCache::new(num_layers)
            };
        }
        &mut self.layers
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some(s)) => s.len,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Llama {
    pub cfg: ModelConfig,
    pub embed_tokens: VocabMatrix,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// `[vocab, hidden]`; the embedding matrix itself when embeddings are tied.
    pub lm_head: VocabMatrix,
    pub rope: Rope,
    pub dtype: DType,
    pub device: Device,
    /// A LoRA adapter applied in `Llama::forward` (generation and evaluation).
    pub adapter: Option<Adapter>,
}

impl Llama {
    /// Loads every weight the config calls for, in `dtype` on `device`.
    pub fn load(
        store: &WeightStore,
        cfg: ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, WeightsError> {
        Self::load_with(store, cfg, dtype, device, None)
    }

    /// As [`Llama::load`]; with `quant`, the seven linear weights of every block are kept
    /// quantized: a quantized GGUF tensor as stored, any other weight quantized to `quant`.
    /// So are the token embeddings (to `quant`) and the LM head (to Q8_0, nearly lossless:
    /// every logit goes through it; a tied matrix is both, so Q8_0). Norms stay dense.
    pub fn load_with(
        store: &WeightStore,
        cfg: ModelConfig,
        dtype: DType,
        device: &Device,
        quant: Option<QuantBits>,
    ) -> std::result::Result<Self, WeightsError> {
        Self::load_mixed(store, cfg, dtype, dtype, device, quant)
    }

    /// As [`Llama::load_with`], computing in `dtype` with the dense frozen matrices (block
    /// linears, embeddings, head) held in `weight_dtype`: on the CPU a bf16 model keeps its
    /// weights at half size and computes in f32 (norms and biases, which are small, are held
    /// in `dtype`).
    pub fn load_mixed(
        store: &WeightStore,
        cfg: ModelConfig,
        dtype: DType,
        weight_dtype: DType,
        device: &Device,
        quant: Option<QuantBits>,
    ) -> std::result::Result<Self, WeightsError> {
        let h = cfg.hidden_size;
        let get = |name: &str, shape: &[usize]| store.get(name, shape, dtype, device);
        let get_weight = |name: &str, shape: &[usize]| store.get(name, shape, weight_dtype, device);
        let linear = |prefix: &str,
                      out: usize,
                      inp: usize,
                      bias: bool|
         -> std::result::Result<Linear, WeightsError> {
            let name = format!("{prefix}.weight");
            Ok(Linear {
                weight: match quant {
                    None => Weight::Dense(get_weight(&name, &[out, inp])?),
                    Some(bits) => {
                        load_quantized(store, &cfg, &name, &[out, inp], bits, weight_dtype, device)?
                    }
                },
                bias: if bias {
                    Some(get(&format!("{prefix}.bias"), &[out])?)
                } else {
                    None
                },
            })
        };
        // Tied embeddings are also the head, which gets the finer format.
        let tied = !store.contains("lm_head.weight") && cfg.tie_word_embeddings;
        let embed_format = match quant {
            Some(_) if tied => Some(GgmlDType::Q8_0),
            q => q.map(QuantBits::ggml),
        };
        let embed_tokens = load_vocab(
            store,
            "model.embed_tokens.weight",
            &cfg,
            embed_format,
            weight_dtype,
            device,
        )?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            blocks.push(Block {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                q_proj: linear(&format!("{p}.self_attn.q_proj"), cfg.q_size(), h, bias)?,
                k_proj: linear(&format!("{p}.self_attn.k_proj"), cfg.kv_size(), h, bias)?,
                v_proj: linear(&format!("{p}.self_attn.v_proj"), cfg.kv_size(), h, bias)?,
                o_proj: linear(&format!("{p}.self_attn.o_proj"), h, cfg.q_size(), false)?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_proj: linear(
                    &format!("{p}.mlp.gate_proj"),
                    cfg.intermediate_size,
                    h,
                    false,
                )?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), cfg.intermediate_size, h, false)?,
                down_proj: linear(
                    &format!("{p}.mlp.down_proj"),
                    h,
                    cfg.intermediate_size,
                    false,
                )?,
            });
        }
        let norm = get("model.norm.weight", &[h])?;
        // Some tied checkpoints still store lm_head; an untied one must have it.
        let lm_head = if tied {
            embed_tokens.clone()
        } else {
            let format = quant.map(|_| GgmlDType::Q8_0);
            load_vocab(store, "lm_head.weight", &cfg, format, weight_dtype, device)?
        };
        let rope = Rope::new(&cfg, device).map_err(|e| WeightsError::Read {
            tensor: "rope".into(),
            file: store.describe(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            cfg,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rope,
            dtype,
            device: device.clone(),
            adapter: None,
        })
    }

    /// Bytes of the frozen weights as loaded (quantized weights at their packed size).
    pub fn frozen_weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = self.embed_tokens.bytes() + t(&self.norm);
        if !self.lm_head.same_as(&self.embed_tokens) {
            n += self.lm_head.bytes();
        }
        for b in &self.blocks {
            n += t(&b.input_norm) + t(&b.post_norm);
            for l in b.linears() {
                n += l.weight.bytes() + l.bias.as_ref().map_or(0, t);
            }
        }
        n
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed_tokens
            .rows(&ids.flatten_all()?, self.dtype)?
            .reshape((b, t, self.cfg.hidden_size))
    }
}
