//! The frozen model as MLX arrays: converted, one weight at a time, from what the project's one
//! load function ([`crate::model::load`]) returned, so both engines train the same weights.
//! Dense weights are held in the compute dtype (f32 on the CPU, bf16 or f16 on a GPU); with
//! `--quantize 4|8` the block linears use MLX's affine quantization in groups of 32 and
//! `quantized_matmul`: Q4_0/Q4_1/Q8_0 blocks mapped onto it as they are ([`super::blocks`]),
//! anything else quantized by MLX.

use super::convert::to_array;
use super::device::Backend;
use crate::error::Result;
use crate::model::lora::Target;
use crate::model::quantized::Weight;
use crate::model::vocab::{VocabMatrix, SLICE_ROWS};
use crate::model::{Llama, ModelConfig};
use candle_core::{DType, Tensor};
use mlx_rs::ops::{dequantize, quantize, quantized_matmul};
use mlx_rs::{Array, Dtype};

/// Group size of MLX's affine quantization here: GGML's Q4_1 and Q8_0 blocks are 32 wide.
pub const GROUP: i32 = 32;

/// A frozen `[out, in]` weight (and bias), dense or quantized. A clone shares the arrays.
#[derive(Clone)]
pub enum Linear {
    Dense {
        /// `Wᵀ`, `[in, out]`, so the forward is one plain matmul.
        wt: Array,
        bias: Option<Array>,
    },
    Quantized {
        w: Array,
        scales: Array,
        biases: Array,
        bits: i32,
        bias: Option<Array>,
        /// Multiplied as a dense copy in the compute dtype, made for each product
        /// ([`dequantizes`]), rather than by MLX's `quantized_matmul`.
        dense: bool,
    },
}

/// Whether quantized linears multiply as dense copies in the compute dtype, made for each
/// product (a dequantization, then the backend's plain matmul), rather than with MLX's
/// quantized matmul: everywhere but Metal, where MLX's quantized kernels are its tuned path
/// (mlx-lm's QLoRA) and no Mac has measured the other. On MLX's CPU backend the quantized
/// matmul is a plain loop: SmolLM2 with `--quantize 4` at 4×256 took 39 s a step with it and
/// 3.0 s with the copies, with the same losses to five decimals. MLX 0.32's CUDA backend has a
/// tensor-core kernel only for `x Wᵀ`; the backward's `dY W` runs its "naive" kernel, and each
/// kernel is compiled with NVRTC on first use (a first 8B step of about a minute on an H200),
/// where a copy is one element-wise kernel and cuBLAS's GEMM. A block's copies live only while
/// it computes. `YOUR_AI_MLX_QUANTIZED=dense|packed` (read once) overrides, to compare.
pub fn dequantizes() -> bool {
    static CHOSEN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| match std::env::var("YOUR_AI_MLX_QUANTIZED").as_deref() {
        Ok("dense") => true,
        Ok("packed") => false,
        _ => !(super::device::on_gpu() && super::device::gpu_backend() == Some(Backend::Metal)),
    })
}

impl Linear {
    fn new(w: &Weight, bias: Option<&Tensor>, dtype: Dtype, bits: Option<i32>) -> Result<Self> {
        let bias = bias.map(|b| to_array(b, dtype)).transpose()?;
        if let (Weight::Quantized(q), Some(_)) = (w, bits) {
            if let Some((w, scales, biases, bits)) = super::blocks::map(q, dtype)? {
                return Ok(Linear::Quantized {
                    w,
                    scales,
                    biases,
                    bits,
                    bias,
                    dense: dequantizes(),
                });
            }
        }
        let dense = to_array(&w.dense(DType::F32)?, dtype)?;
        let cols = dense.shape()[1];
        Ok(match bits {
            Some(bits) if cols % GROUP == 0 => {
                let (w, scales, biases) = quantize(&dense, GROUP, bits)?;
                Linear::Quantized {
                    w,
                    scales,
                    biases,
                    bits,
                    bias,
                    dense: dequantizes(),
                }
            }
            _ => Linear::Dense {
                wt: dense.t().contiguous()?,
                bias,
            },
        })
    }

    /// `x Wᵀ (+ b)` for `x` `[n, in]`.
    pub fn forward(&self, x: &Array) -> Result<Array, mlx_rs::error::Exception> {
        let y = self.product(x, true)?;
        match self.bias() {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }

    /// `dY W` for `dy` `[n, out]`: the gradient of the forward's input (the frozen weight's own
    /// gradient is never needed).
    pub fn input_gradient(&self, dy: &Array) -> Result<Array, mlx_rs::error::Exception> {
        self.product(dy, false)
    }

    /// `x Wᵀ` (`transpose`) or `x W`, without the bias.
    fn product(&self, x: &Array, transpose: bool) -> Result<Array, mlx_rs::error::Exception> {
        match self {
            Linear::Dense { wt, .. } if transpose => x.matmul(wt),
            Linear::Dense { wt, .. } => x.matmul(wt.t()),
            Linear::Quantized {
                w,
                scales,
                biases,
                bits,
                dense: true,
                ..
            } => {
                let w = dequantize(w, scales, biases, GROUP, *bits)?;
                x.matmul(if transpose { w.t() } else { w })
            }
            Linear::Quantized {
                w,
                scales,
                biases,
                bits,
                ..
            } => quantized_matmul(x, w, scales, biases, transpose, GROUP, *bits),
        }
    }

    /// The linears `parts` (of one input) as one: their rows joined, in order, so that one
    /// product computes all their outputs side by side. Biases join too, zeros standing in
    /// for a part without one.
    fn join(parts: Vec<Linear>) -> Result<Self> {
        let cat = |v: Vec<&Array>, axis: i32| mlx_rs::ops::concatenate(&v, axis);
        let first = match parts.as_slice() {
            [one] => return Ok(one.clone()),
            [first, ..] => first,
            [] => return Err(crate::error::Error::Usage("no linears to join".into())),
        };
        let bias = if parts.iter().any(|p| p.bias().is_some()) {
            let filled = parts
                .iter()
                .map(|p| match p.bias() {
                    Some(b) => Ok(b.clone()),
                    None => mlx_rs::ops::zeros_dtype(&[p.outputs()], p.dtype()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(cat(filled.iter().collect(), 0)?)
        } else {
            None
        };
        let unlike = || {
            crate::error::Error::Usage(
                "the MLX engine joins the linears of one input, and these are not all dense or \
                 all quantized to one width"
                    .into(),
            )
        };
        match first {
            Linear::Dense { .. } => {
                let wts = parts
                    .iter()
                    .map(|p| match p {
                        Linear::Dense { wt, .. } => Ok(wt),
                        _ => Err(unlike()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Linear::Dense {
                    wt: cat(wts, 1)?,
                    bias,
                })
            }
            &Linear::Quantized { bits, dense, .. } => {
                let held = parts
                    .iter()
                    .map(|p| match p {
                        Linear::Quantized {
                            w,
                            scales,
                            biases,
                            bits: b,
                            ..
                        } if *b == bits => Ok([w, scales, biases]),
                        _ => Err(unlike()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let part = |i: usize| cat(held.iter().map(|h| h[i]).collect(), 0);
                Ok(Linear::Quantized {
                    w: part(0)?,
                    scales: part(1)?,
                    biases: part(2)?,
                    bits,
                    bias,
                    dense,
                })
            }
        }
    }

    /// The width of the product's output.
    fn outputs(&self) -> i32 {
        match self {
            Linear::Dense { wt, .. } => wt.shape()[1],
            Linear::Quantized { scales, .. } => scales.shape()[0],
        }
    }

    fn bias(&self) -> Option<&Array> {
        match self {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// The dtype of the product's output.
    fn dtype(&self) -> Dtype {
        match self {
            Linear::Dense { wt, .. } => wt.dtype(),
            Linear::Quantized { scales, .. } => scales.dtype(),
        }
    }

    /// The arrays held.
    fn arrays(&self) -> Vec<&Array> {
        match self {
            Linear::Dense { wt, bias } => [Some(wt), bias.as_ref()].into_iter().flatten().collect(),
            Linear::Quantized {
                w,
                scales,
                biases,
                bias,
                ..
            } => [Some(w), Some(scales), Some(biases), bias.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Dense { wt, bias } => wt.nbytes() + bias.as_ref().map_or(0, Array::nbytes),
            Linear::Quantized {
                w,
                scales,
                biases,
                bias,
                ..
            } => {
                w.nbytes()
                    + scales.nbytes()
                    + biases.nbytes()
                    + bias.as_ref().map_or(0, Array::nbytes)
            }
        }
    }
}

/// One transformer block's frozen weights. A clone shares the arrays.
#[derive(Clone)]
pub struct Block {
    pub input_norm: Array,
    pub post_norm: Array,
    /// The linears joined by input ([`Target::BY_INPUT`]): q, k and v; o; gate and up;
    /// down. Each is one product, its outputs side by side.
    pub linears: [Linear; 4],
}

impl Block {
    fn arrays(&self) -> Vec<&Array> {
        let mut all = vec![&self.input_norm, &self.post_norm];
        all.extend(self.linears.iter().flat_map(Linear::arrays));
        all
    }
}

/// The frozen model. A clone shares the arrays (and starts with no compiled functions).
#[derive(Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    pub dtype: Dtype,
    /// `[vocab, hidden]`.
    pub embed: Array,
    pub blocks: Vec<Block>,
    pub norm: Array,
    /// `[vocab, hidden]`: the same array as `embed` when the embeddings are tied (never a
    /// second copy); the head multiplies by its transpose, a view.
    pub head: Array,
    /// The head is the embedding (tied).
    pub tied: bool,
    /// RoPE's frequencies as MLX's `fast::rope` takes them: one per pair of head dimensions,
    /// the inverse of the (scaled) inverse frequencies.
    pub rope_freqs: Array,
    /// The blocks' compiled vector-Jacobian products ([`super::compiled`]): they hold the
    /// weights they were traced with, so they live and go with the model.
    pub compiled: super::compiled::Cache,
}

/// A vocabulary matrix as one array in `dtype`, converted and evaluated in parts of
/// [`SLICE_ROWS`] rows (a dense matrix is never copied whole into f32, on the host or in MLX),
/// the host's matrix dropped before the parts are joined: at most the host's matrix and the
/// parts, then the parts and the whole, are held at once.
fn vocab(m: VocabMatrix, dtype: Dtype) -> Result<Array> {
    let (rows, _) = m.dims2()?;
    let part = |t: Tensor| -> Result<Array> {
        let a = to_array(&t, dtype)?;
        a.eval()?;
        Ok(a)
    };
    let parts = match &m {
        VocabMatrix::Dense(w) => (0..rows)
            .step_by(SLICE_ROWS)
            .map(|start| part(w.narrow(0, start, SLICE_ROWS.min(rows - start))?))
            .collect::<Result<Vec<_>>>()?,
        VocabMatrix::Quantized(_) => (0..m.slices().len())
            .map(|i| part(m.slice(i, DType::F32)?))
            .collect::<Result<Vec<_>>>()?,
    };
    drop(m);
    let whole = match parts.len() {
        1 => parts.into_iter().next().unwrap_or_else(|| unreachable!()),
        _ => mlx_rs::ops::concatenate(&parts, 0)?,
    };
    whole.eval()?;
    Ok(whole)
}

impl Model {
    /// The MLX copy of `model`'s frozen weights in `dtype`; the block linears quantized to
    /// `bits` when given. Converted and evaluated one block at a time, each candle block
    /// dropped once its arrays exist: MLX is lazy, so converting everything before one final
    /// evaluation would hold every dense f32 copy made on the way (32 GB for a quantized 8B
    /// model), and the candle model beside the converted one doubled the weights.
    pub fn from_llama(model: Llama, dtype: Dtype, bits: Option<i32>) -> Result<Self> {
        let Llama {
            cfg,
            embed_tokens,
            blocks: source,
            norm,
            lm_head,
            ..
        } = model;
        let mut blocks = Vec::with_capacity(source.len());
        for b in source {
            let l = b.linears();
            let group = |g: usize| -> Result<Linear> {
                let parts = Target::BY_INPUT[g]
                    .clone()
                    .map(|i| Linear::new(&l[i].weight, l[i].bias.as_ref(), dtype, bits))
                    .collect::<Result<Vec<_>>>()?;
                Linear::join(parts)
            };
            let block = Block {
                input_norm: to_array(&b.input_norm, dtype)?,
                post_norm: to_array(&b.post_norm, dtype)?,
                linears: [group(0)?, group(1)?, group(2)?, group(3)?],
            };
            mlx_rs::transforms::eval(block.arrays())?;
            blocks.push(block);
        }
        let tied = lm_head.same_as(&embed_tokens);
        let (embed, head) = if tied {
            // One matrix: the head's handle goes first, so the conversion can drop it.
            drop(lm_head);
            let embed = vocab(embed_tokens, dtype)?;
            (embed.clone(), embed)
        } else {
            (vocab(embed_tokens, dtype)?, vocab(lm_head, dtype)?)
        };
        let freqs: Vec<f32> = crate::model::rope::inv_freqs(&cfg)
            .iter()
            .map(|f| 1.0 / f)
            .collect();
        let n = freqs.len() as i32;
        let norm = to_array(&norm, dtype)?;
        let rope_freqs = Array::from_slice(&freqs, &[n]);
        mlx_rs::transforms::eval([&norm, &rope_freqs])?;
        Ok(Self {
            cfg,
            dtype,
            embed,
            blocks,
            norm,
            head,
            tied,
            rope_freqs,
            compiled: Default::default(),
        })
    }

    /// The model with its quantized linears multiplied as dense copies (`on`) or by MLX's
    /// quantized matmul, whatever [`dequantizes`] chose.
    pub fn with_dense_products(mut self, on: bool) -> Self {
        for lin in self.blocks.iter_mut().flat_map(|b| b.linears.iter_mut()) {
            if let Linear::Quantized { dense, .. } = lin {
                *dense = on;
            }
        }
        self
    }

    /// Bytes of frozen weights held.
    pub fn bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.input_norm.nbytes()
                    + b.post_norm.nbytes()
                    + b.linears.iter().map(Linear::bytes).sum::<usize>()
            })
            .sum();
        let head = if self.tied { 0 } else { self.head.nbytes() };
        blocks + self.embed.nbytes() + head + self.norm.nbytes()
    }
}
