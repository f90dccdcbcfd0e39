//! Decoding's fused token step (`Llama::decode_next`: one token through every block on plain
//! slices, q/k/v and gate/up as one block product each) against the tensor path
//! (`Llama::forward` on a decoding cache), on tiny random Llamas stored as Q4_1 and Q8_0 GGUFs,
//! with grouped K/V heads, tied and untied heads, and an adapter applied as low-rank terms.
//!
//! Both paths round each product's input to 8 bits, a step function: a float-order difference
//! of 1e-7 can move one value by a whole step (≈0.4% of its block's largest entry). On two
//! blocks that stays far below the tolerance here, while a wrong rotation, head mapping, offset
//! or adapter term moves logits by their own size.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use common::{random_adapter, tiny_weights, write_gguf, TinySpec};
use your_ai::model::quantized::{QuantBits, Weight};
use your_ai::model::{KvCache, Llama, LoadOptions};
use your_ai::weights::{SafetensorsDir, WeightStore};

/// Largest `|a − b|`; NaN when any entry is not finite (`f32::max` would skip a NaN).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f32::NAN;
    }
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|a, b| v[*a].total_cmp(&v[*b]))
        .unwrap_or(0) as u32
}

/// The tiny model the fused-step tests decode: grouped-query attention, a tied or untied
/// head, with or without Qwen2's q/k/v biases.
fn fused_step_spec(tied: bool, qkv_bias: bool) -> TinySpec {
    TinySpec {
        hidden: 128,
        intermediate: 192,
        heads: 4,
        kv_heads: 2,
        tied,
        qkv_bias,
        ..TinySpec::default()
    }
}

#[test]
fn the_fused_token_step_equals_the_tensor_path() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantBits::Four),
        ..LoadOptions::cpu_f32()
    };
    // (block type, tied head, Qwen2's q/k/v biases). The two paths' sums differ in order, so
    // an activation's 8-bit rounding can flip by one step in one path and not the other: that
    // moves these models' logits by about 0.6% of the largest (measured), which the tolerance
    // admits; a wrong or missing term in the fused step moves them by far more. With biases
    // such flips come sooner: that case runs 20 steps (the exact dense test covers biases
    // over 30).
    for (qtype, tied, qkv_bias) in [
        (GgmlDType::Q4_1, false, false),
        (GgmlDType::Q8_0, true, false),
        (GgmlDType::Q8_0, false, true),
    ] {
        let spec = fused_step_spec(tied, qkv_bias);
        let path = dir.path().join(format!("tiny-{qtype:?}.gguf"));
        let arch = if qkv_bias { "qwen2" } else { "llama" };
        write_gguf(&path, &spec, &tiny_weights(&spec, 5), qtype, arch);
        let mut loaded = your_ai::model::load(path.to_str().unwrap(), &opts, None).unwrap();
        let adapter_dir = dir.path().join(format!("adapter-{qtype:?}"));
        let adapter = random_adapter(&loaded.model.cfg, &adapter_dir, 0.3, 4);
        for with_adapter in [false, true] {
            loaded.model.adapter = with_adapter.then(|| adapter.clone());
            let m = &loaded.model;
            let prompt = Tensor::new(&[[3u32, 17, 40, 8, 61]], &Device::Cpu).unwrap();
            let mut fused = KvCache::for_decoding(m.blocks.len());
            let mut tensors = KvCache::for_decoding(m.blocks.len());
            m.forward(&prompt, &mut fused).unwrap();
            m.forward(&prompt, &mut tensors).unwrap();
            let mut next = 5u32;
            let mut worst = 0f32;
            for step in 0..if qkv_bias { 20 } else { 40 } {
                let got = m
                    .decode_next(next, &mut fused)
                    .unwrap()
                    .expect("the fused step applies");
                let ids = Tensor::new(&[[next]], &Device::Cpu).unwrap();
                let h = m.forward_hidden(&ids, &mut tensors).unwrap();
                let want: Vec<f32> = m
                    .decode_logits(&h)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!((got.len(), fused.len()), (want.len(), tensors.len()));
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let diff = max_diff(&got, &want);
                worst = worst.max(diff / scale);
                assert!(
                    diff <= 1.5e-2 * scale,
                    "{qtype:?}, adapter {with_adapter}, step {step}: logits differ by {diff} \
                     (largest {scale})"
                );
                next = argmax(&want);
            }
            eprintln!("{qtype:?} adapter {with_adapter}: worst relative difference {worst:.2e}");
        }
    }
}

/// Dense weights take the fused token step too, read as held (f32, or bf16/f16 widened in
/// registers) against the exact input: it equals the tensor path (each weight widened for the
/// GEMM) to float rounding, token after token, with q/k/v biases (Qwen2), tied and untied heads, and an adapter's low-rank terms.
/// No 8-bit rounding here, so the tolerance is a thousand times tighter than the blocks'.
#[test]
fn dense_weights_take_the_fused_step_exactly() {
    use candle_core::DType;
    let dir = tempfile::tempdir().unwrap();
    for (dt, tied, qkv_bias) in [
        (DType::F32, false, false),
        (DType::BF16, true, true),
        (DType::F16, false, true),
    ] {
        let spec = fused_step_spec(tied, qkv_bias);
        let path = dir.path().join(format!("tiny-{dt:?}"));
        common::write_hf_dir(&path, &spec, &tiny_weights(&spec, 7), dt);
        // As `generate` loads it on the CPU: weights held in `dt`, arithmetic in f32.
        let opts = LoadOptions::new(Device::Cpu, dt, None).for_kernels();
        assert_eq!((opts.dtype, opts.weight_dtype), (DType::F32, dt));
        let cfg = your_ai::model::ModelConfig::from_hf_file(&path.join("config.json")).unwrap();
        let store = WeightStore::Safetensors(SafetensorsDir::open(&path).unwrap());
        let mut model = Llama::load_mixed(&store, cfg, opts.dtype, dt, &Device::Cpu, None).unwrap();
        for b in &model.blocks {
            for l in b.linears() {
                assert!(matches!(&l.weight, Weight::Dense(w) if w.dtype() == dt));
            }
        }
        let adapter_dir = dir.path().join(format!("adapter-{dt:?}"));
        let adapter = random_adapter(&model.cfg, &adapter_dir, 0.3, 4);
        for with_adapter in [false, true] {
            model.adapter = with_adapter.then(|| adapter.clone());
            let m = &model;
            let prompt = Tensor::new(&[[3u32, 17, 40, 8, 61]], &Device::Cpu).unwrap();
            let mut fused = KvCache::for_decoding(m.blocks.len());
            // Not a decoding cache: the products widen each weight for the GEMM, as `eval` does,
            // an independent computation (a decoding one reads dense weights as the step does).
            let mut tensors = KvCache::new(m.blocks.len());
            m.forward(&prompt, &mut fused).unwrap();
            m.forward(&prompt, &mut tensors).unwrap();
            let mut next = 5u32;
            for step in 0..30 {
                let got = m
                    .decode_next(next, &mut fused)
                    .unwrap()
                    .expect("the fused step applies to dense weights");
                let ids = Tensor::new(&[[next]], &Device::Cpu).unwrap();
                let h = m.forward_hidden(&ids, &mut tensors).unwrap();
                let want: Vec<f32> = m
                    .logits(&h)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let diff = max_diff(&got, &want);
                assert!(
                    diff <= 5e-6 * scale,
                    "{dt:?}, adapter {with_adapter}, step {step}: logits differ by {diff} \
                     (largest {scale})"
                );
                next = argmax(&want);
            }
        }
    }
}

/// `--kv-cache f16`: keys and values held in f16, read by the fused step and by the tensor
/// path (a prompt's rows widen the cache for the GEMMs; one new token takes the cached-
/// attention kernel): they agree with each other and with the f32 cache within f16's rounding
/// of keys and values (the two paths' keys differ in float order, so an entry can round to
/// the neighbouring f16), token after token.
#[test]
fn an_f16_kv_cache_decodes_within_its_rounding() {
    use candle_core::DType;
    let dir = tempfile::tempdir().unwrap();
    let spec = fused_step_spec(false, true);
    let path = dir.path().join("tiny");
    common::write_hf_dir(&path, &spec, &tiny_weights(&spec, 11), DType::F32);
    let cfg = your_ai::model::ModelConfig::from_hf_file(&path.join("config.json")).unwrap();
    let store = WeightStore::Safetensors(SafetensorsDir::open(&path).unwrap());
    let m = Llama::load(&store, cfg, DType::F32, &Device::Cpu).unwrap();
    let half = || KvCache::for_decoding(m.blocks.len()).holding(Some(DType::F16));
    let (mut fused, mut tensors, mut exact) =
        (half(), half(), KvCache::for_decoding(m.blocks.len()));
    let prompt = Tensor::new(&[[3u32, 17, 40, 8, 61, 2, 9]], &Device::Cpu).unwrap();
    for c in [&mut fused, &mut tensors, &mut exact] {
        m.forward(&prompt, c).unwrap();
    }
    let logits = |c: &mut KvCache, id: u32| -> Vec<f32> {
        let ids = Tensor::new(&[[id]], &Device::Cpu).unwrap();
        let h = m.forward_hidden(&ids, c).unwrap();
        m.logits(&h)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut next = 5u32;
    let mut worst = 0f32;
    for step in 0..30 {
        let got = m
            .decode_next(next, &mut fused)
            .unwrap()
            .expect("fused step");
        let tensor = logits(&mut tensors, next);
        let want = logits(&mut exact, next);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let paths = max_diff(&got, &tensor);
        assert!(
            paths <= 1e-3 * scale,
            "step {step}: the two f16 paths differ by {paths}"
        );
        let rounding = max_diff(&got, &want);
        worst = worst.max(rounding / scale);
        assert!(
            rounding <= 5e-3 * scale,
            "step {step}: f16 vs f32 cache: {rounding} (largest {scale})"
        );
        next = argmax(&want);
    }
    // Held in f16 for real: the rounding shows.
    assert!(
        worst > 0.0,
        "an f16 cache gave the f32 cache's logits exactly"
    );
}

/// A k-quant GGUF (the common Q4_K_M kind) keeps its blocks for decoding too, read by candle's
/// quantized matmul (the fused step does not cover the format, so the tensor path runs): its
/// greedy logits stay within the 8-bit rounding of the exact product on the dequantized
/// weights, token after token. On these random weights that rounding (x to 8 bits per 256
/// for the k-quants) moves logits by 2-15% of the largest, 6% on average (our own Q4_1
/// kernel: 1-8%); a wrong product moves them by their size.
/// (`sliced.rs` holds candle's path to ours where both read the same format.)
#[test]
fn k_quant_blocks_decode_within_rounding_of_the_dequantized_product() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        hidden: 256,
        intermediate: 512,
        heads: 4,
        kv_heads: 2,
        ..TinySpec::default()
    };
    let path = dir.path().join("tiny-q4k.gguf");
    write_gguf(
        &path,
        &spec,
        &tiny_weights(&spec, 6),
        GgmlDType::Q4K,
        "llama",
    );
    let opts = LoadOptions {
        quantize: Some(QuantBits::Four),
        ..LoadOptions::cpu_f32()
    };
    let m = your_ai::model::load(path.to_str().unwrap(), &opts, None)
        .unwrap()
        .model;
    for b in &m.blocks {
        for l in b.linears() {
            assert!(matches!(&l.weight, Weight::Quantized(q) if q.dtype() == GgmlDType::Q4K));
        }
    }
    let prompt = Tensor::new(&[[3u32, 17, 40, 8]], &Device::Cpu).unwrap();
    let mut decoding = KvCache::for_decoding(m.blocks.len());
    let mut exact = KvCache::new(m.blocks.len());
    m.forward(&prompt, &mut decoding).unwrap();
    m.forward(&prompt, &mut exact).unwrap();
    let (mut next, mut total) = (5u32, 0f32);
    for step in 0..12 {
        let ids = Tensor::new(&[[next]], &Device::Cpu).unwrap();
        let logits = |cache: &mut KvCache| -> Vec<f32> {
            let h = m.forward_hidden(&ids, cache).unwrap();
            let l = if cache.decoding() {
                m.decode_logits(&h)
            } else {
                m.logits(&h)
            };
            l.unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        assert!(m.decode_next(next, &mut decoding).unwrap().is_none());
        let (got, want) = (logits(&mut decoding), logits(&mut exact));
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = max_diff(&got, &want);
        assert!(
            diff <= 0.3 * scale,
            "step {step}: logits differ by {diff} (largest {scale})"
        );
        total += diff / scale;
        next = argmax(&want);
    }
    assert!(
        total / 12.0 < 0.1,
        "mean relative difference {}",
        total / 12.0
    );
}

/// How `generate`, `chat`, `serve` and `validate` load each kind of checkpoint on the CPU
/// (`decode_options`): `(arithmetic, weights, quantization)`.
#[test]
fn decoding_holds_the_weights_as_stored_unless_the_flags_say_otherwise() {
    use candle_core::DType::{BF16, F16, F32};
    use your_ai::model::args::{decode_options, ModelArgs};
    use your_ai::runtime::device::{DTypeChoice as D, DeviceChoice};
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        hidden: 128,
        intermediate: 192,
        ..TinySpec::default()
    };
    let w = tiny_weights(&spec, 1);
    let hf = dir.path().join("bf16");
    common::write_hf_dir(&hf, &spec, &w, BF16);
    let q41 = dir.path().join("q41.gguf");
    write_gguf(&q41, &spec, &w, GgmlDType::Q4_1, "llama");
    let f16 = dir.path().join("f16.gguf");
    write_gguf(&f16, &spec, &w, GgmlDType::F16, "llama");
    let load = |path: &std::path::Path, dtype: D, quantize: Option<QuantBits>| {
        let args = ModelArgs {
            model: path.to_str().unwrap().to_string(),
            device: DeviceChoice::Cpu,
            dtype,
        };
        let o = decode_options(&args, quantize).unwrap();
        (o.dtype, o.weight_dtype, o.quantize)
    };
    // A bf16 checkpoint stays bf16 and computes in f32, unless told otherwise.
    assert_eq!(load(&hf, D::Auto, None), (F32, BF16, None));
    assert_eq!(load(&hf, D::Bf16, None), (F32, BF16, None));
    assert_eq!(load(&hf, D::F32, None), (F32, F32, None));
    let four = Some(QuantBits::Four);
    assert_eq!(load(&hf, D::Auto, four), (F32, F32, four));
    // A quantized GGUF keeps its blocks; a dtype asks for dense weights.
    assert_eq!(load(&q41, D::Auto, None), (F32, F32, four));
    assert_eq!(load(&q41, D::Bf16, None), (F32, BF16, None));
    assert_eq!(load(&q41, D::F32, None), (F32, F32, None));
    // An F16 GGUF is held as stored.
    assert_eq!(load(&f16, D::Auto, None), (F32, F16, None));
}

/// A long prompt is processed piece by piece (its attention scores grow with rows × context,
/// so one forward over 8k tokens took gigabytes): the logits after it are the whole prompt's,
/// with or without a previous piece's stop asked between pieces.
#[test]
fn a_prompt_in_pieces_gives_the_whole_prompt_s_logits() {
    use std::ops::ControlFlow;
    use your_ai::infer::generate::prefill;
    let dir = tempfile::tempdir().unwrap();
    let spec = fused_step_spec(false, true);
    let path = dir.path().join("tiny");
    common::write_hf_dir(
        &path,
        &spec,
        &tiny_weights(&spec, 3),
        candle_core::DType::F32,
    );
    let cfg = your_ai::model::ModelConfig::from_hf_file(&path.join("config.json")).unwrap();
    let store = WeightStore::Safetensors(SafetensorsDir::open(&path).unwrap());
    let dt = candle_core::DType::F32;
    let model = Llama::load_mixed(&store, cfg, dt, dt, &Device::Cpu, None).unwrap();
    let prompt: Vec<u32> = (0..45u32).map(|i| (i * 37 + 11) % 90).collect();
    let logits = |rows: usize| {
        let mut cache = KvCache::for_decoding(model.blocks.len());
        let mut asked = 0;
        let l = prefill(&model, &prompt, &mut cache, rows, || {
            asked += 1;
            ControlFlow::Continue(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(asked, prompt.len().div_ceil(rows) - 1);
        assert_eq!(cache.len(), prompt.len());
        l
    };
    let whole = logits(prompt.len());
    let scale = whole.iter().fold(0f32, |a, v| a.max(v.abs()));
    for rows in [1, 7, 16, 44] {
        let diff = max_diff(&logits(rows), &whole);
        assert!(
            diff <= 1e-5 * scale,
            "{rows} rows a piece: {diff} (largest {scale})"
        );
    }
    // Stopped between pieces: nothing comes back.
    let mut cache = KvCache::for_decoding(model.blocks.len());
    let stopped = prefill(&model, &prompt, &mut cache, 16, || ControlFlow::Break(())).unwrap();
    assert!(stopped.is_none());
}
