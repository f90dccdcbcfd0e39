//! Decoding's fused token step: one new token of one sequence through every block and the LM
//! head on plain slices ([`crate::kernels::one_token`]). The products read the weights as
//! held: a GGUF's own blocks by [`qmatvec::qmatvec_parts`] (the input rounded to 8 bits, as
//! llama.cpp does), dense f32, bf16 or f16 rows by [`matvec::matvec_parts`] (exact f32
//! arithmetic). Products that share an input (q, k and v; gate and up) are one dispatch on the
//! pool, and nothing between them is a tensor op. On SmolLM2 that is 5 dispatches a block
//! instead of about 20 tensor ops and 7 dispatches.
//!
//! It computes what [`Llama::forward`] on a decoding cache computes (adapters as unmerged
//! low-rank terms on the exact input, attention over every cached position), and the tests hold
//! it to that path. It applies where each product's linears are all quantized in a format the
//! block kernel reads or all dense, the model computes in f32 on the CPU, and the cache holds
//! the prompt already (the prompt itself runs batched through the tensor path).

use crate::kernels::{matvec, one_token, qmatvec, View};
use crate::model::llama::{KvCache, KvSlot, Linear, Llama};
use crate::model::lora::Target;
use crate::model::quantized::Weight;
use crate::model::vocab::VocabMatrix;
use candle_core::{DType, Device, Result, Tensor};

/// One product of the token step: several linears over one input, each filling the outputs
/// from its offset, read as GGML blocks or as dense rows (f32, bf16 or f16), with the biases
/// they add.
enum Product<'a> {
    Blocks(Vec<(qmatvec::Blocks<'a>, usize)>, Vec<(View<'a>, usize)>),
    Dense(Vec<(matvec::Matrix<'a>, usize)>, Vec<(View<'a>, usize)>),
}

impl<'a> Product<'a> {
    /// The product of `lins` (each with its output offset), or `None` where the token step
    /// does not read them: quantized in a format the block kernel does not read, a mix of
    /// quantized and dense, or a bias that is not f32.
    fn of(lins: &[(&'a Linear, usize)]) -> Option<Self> {
        let mut biases = vec![];
        for (lin, at) in lins {
            if let Some(b) = &lin.bias {
                biases.push((View::of(b)?, *at));
            }
        }
        let blocks: Option<Vec<_>> = lins
            .iter()
            .map(|(lin, at)| match &lin.weight {
                Weight::Quantized(q) => q.block_parts(*at),
                Weight::Dense(_) => None,
            })
            .collect();
        if let Some(blocks) = blocks {
            return Some(Self::Blocks(blocks.into_iter().flatten().collect(), biases));
        }
        let dense: Option<Vec<_>> = lins
            .iter()
            .map(|(lin, at)| match &lin.weight {
                Weight::Dense(w) => Some((matvec::Matrix::of(w)?, *at)),
                Weight::Quantized(_) => None,
            })
            .collect();
        Some(Self::Dense(dense?, biases))
    }

    /// `out = W·input (+ b)`: blocks against the input rounded to 8 bits, as llama.cpp
    /// computes; dense rows against the exact input.
    fn run(&self, input: &[f32], out: &mut [f32]) -> Result<()> {
        let (done, biases) = match self {
            Self::Blocks(parts, biases) => {
                let xq = qmatvec::quantize_x(input, 1, input.len());
                (qmatvec::qmatvec_parts(parts, &xq, out), biases)
            }
            Self::Dense(parts, biases) => (matvec::matvec_parts(parts, input, out), biases),
        };
        if !done {
            candle_core::bail!("decoding: a product does not fit its output");
        }
        for (b, at) in biases {
            add(&mut out[*at..], b.slice());
        }
        Ok(())
    }
}

/// What one block's step reads: its norms, its products by the outputs they fill, and its
/// adapter pairs `(A, B)` by target.
struct BlockPlan<'a> {
    input_norm: View<'a>,
    post_norm: View<'a>,
    qkv: Product<'a>,
    o: Product<'a>,
    gate_up: Product<'a>,
    down: Product<'a>,
    pairs: [Option<(View<'a>, View<'a>)>; 7],
}

impl Llama {
    /// Every block's plan, or `None` where the fused step does not apply to this model.
    fn decode_plan(&self) -> Option<Vec<BlockPlan<'_>>> {
        if !self.device.is_cpu() || self.dtype != DType::F32 || !crate::kernels::enabled() {
            return None;
        }
        let (qs, kvs) = (self.cfg.q_size(), self.cfg.kv_size());
        let inter = self.cfg.intermediate_size;
        let mut plans = Vec::with_capacity(self.blocks.len());
        for (layer, b) in self.blocks.iter().enumerate() {
            let mut pairs: [Option<(View, View)>; 7] = Default::default();
            for t in Target::ALL {
                if let Some(p) = self.adapter.as_ref().and_then(|a| a.get(layer, t)) {
                    pairs[t.index()] = Some((View::of(&p.a)?, View::of(&p.b)?));
                }
            }
            plans.push(BlockPlan {
                input_norm: View::of(&b.input_norm)?,
                post_norm: View::of(&b.post_norm)?,
                qkv: Product::of(&[(&b.q_proj, 0), (&b.k_proj, qs), (&b.v_proj, qs + kvs)])?,
                o: Product::of(&[(&b.o_proj, 0)])?,
                gate_up: Product::of(&[(&b.gate_proj, 0), (&b.up_proj, inter)])?,
                down: Product::of(&[(&b.down_proj, 0)])?,
                pairs,
            });
        }
        Some(plans)
    }

    /// Logits (f32, one per vocabulary entry) for token `id` after the positions in `cache`,
    /// which takes its keys and values: the fused step. `None` (the cache untouched) where it
    /// does not apply; the caller then takes the tensor path.
    pub fn decode_next(&self, id: u32, cache: &mut KvCache) -> Result<Option<Vec<f32>>> {
        let pos = cache.len();
        let window_ok = self.cfg.sliding_window.is_none_or(|w| pos < w);
        if !cache.decoding() || pos == 0 || !window_ok {
            return Ok(None);
        }
        let Some(plans) = self.decode_plan() else {
            return Ok(None);
        };
        let store = cache.store();
        let slots = cache.slots(self.blocks.len());
        let batch_one = |s: &Option<KvSlot>| {
            s.as_ref()
                .is_some_and(|s| s.buffers().0.dims().first() == Some(&1))
        };
        if !slots.iter().all(batch_one) {
            return Ok(None);
        }
        let cfg = &self.cfg;
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (hidden, qs, kvs) = (cfg.hidden_size, cfg.q_size(), cfg.kv_size());
        let inter = cfg.intermediate_size;
        let eps = cfg.rms_norm_eps as f32;
        let scale = self.adapter.as_ref().map_or(0.0, |a| a.cfg.scale()) as f32;
        let ids = Tensor::new(&[[id]], &self.device)?;
        let mut x = self.embed(&ids)?.flatten_all()?.to_vec1::<f32>()?;
        let (cos, sin) = self.rope.cos_sin_range(pos, 1, DType::F32)?;
        let (cos, sin) = (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?);
        let lora = |plan: &BlockPlan, t: Target, input: &[f32], y: &mut [f32]| {
            if let Some((a, b)) = &plan.pairs[t.index()] {
                one_token::add_low_rank(y, input, a.slice(), b.slice(), scale);
            }
        };
        for (plan, slot) in plans.iter().zip(slots.iter_mut()) {
            let h = one_token::rms_norm(&x, plan.input_norm.slice(), eps);
            let mut qkv = vec![0f32; qs + 2 * kvs];
            plan.qkv.run(&h, &mut qkv)?;
            let (q, kv) = qkv.split_at_mut(qs);
            let (k, v) = kv.split_at_mut(kvs);
            lora(plan, Target::Q, &h, q);
            lora(plan, Target::K, &h, k);
            lora(plan, Target::V, &h, v);
            one_token::rope(q, &cos, &sin, d);
            one_token::rope(k, &cos, &sin, d);
            let new = |s: &[f32]| Tensor::from_slice(s, (1, nkv, 1, d), &Device::Cpu);
            KvSlot::append(slot, &new(k)?, &new(v)?, store)?;
            let mut attn = vec![0f32; qs];
            {
                let Some((kb, vb, len)) = slot.as_ref().map(KvSlot::buffers) else {
                    candle_core::bail!("decoding: a block's KV cache is missing");
                };
                let cap = kb.dim(2)?;
                let (kb, vb) = (kb.reshape((nkv * cap, d))?, vb.reshape((nkv * cap, d))?);
                let (Some(km), Some(vm)) = (matvec::Matrix::of(&kb), matvec::Matrix::of(&vb))
                else {
                    candle_core::bail!("decoding: the KV cache is not on the CPU");
                };
                let (Some(kr), Some(vr)) = (km.data(), vm.data()) else {
                    candle_core::bail!("decoding: the KV cache is not on the CPU");
                };
                one_token::attend(&mut attn, q, kr, vr, (nh, nkv, d), cap, len);
            }
            let mut o = vec![0f32; hidden];
            plan.o.run(&attn, &mut o)?;
            lora(plan, Target::O, &attn, &mut o);
            add(&mut x, &o);

            let h2 = one_token::rms_norm(&x, plan.post_norm.slice(), eps);
            let mut gate_up = vec![0f32; 2 * inter];
            plan.gate_up.run(&h2, &mut gate_up)?;
            let (gate, up) = gate_up.split_at_mut(inter);
            lora(plan, Target::Gate, &h2, gate);
            lora(plan, Target::Up, &h2, up);
            let act = one_token::swiglu(&mut gate_up);
            let mut down = vec![0f32; hidden];
            plan.down.run(act, &mut down)?;
            lora(plan, Target::Down, act, &mut down);
            add(&mut x, &down);
        }
        drop(plans);
        let Some(norm) = View::of(&self.norm) else {
            candle_core::bail!("decoding: the final norm is not f32 on the CPU");
        };
        let h = one_token::rms_norm(&x, norm.slice(), eps);
        match &self.lm_head {
            VocabMatrix::Quantized(head) => {
                if let Some(logits) = head.matvec_refined(&h)? {
                    return Ok(Some(logits));
                }
            }
            VocabMatrix::Dense(w) => {
                if let Some(m) = matvec::Matrix::of(w) {
                    let mut logits = vec![0f32; m.dims().0];
                    if matvec::matvec_parts(&[(m, 0)], &h, &mut logits) {
                        return Ok(Some(logits));
                    }
                }
            }
        }
        let h = Tensor::from_vec(h, (1, hidden), &self.device)?;
        Ok(Some(self.decode_logits(&h)?.flatten_all()?.to_vec1()?))
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
