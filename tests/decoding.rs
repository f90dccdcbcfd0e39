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
use your_ai::model::quantized::QuantBits;
use your_ai::model::{KvCache, LoadOptions};

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|a, b| v[*a].total_cmp(&v[*b]))
        .unwrap_or(0) as u32
}

#[test]
fn the_fused_token_step_equals_the_tensor_path() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        quantize: Some(QuantBits::Four),
        ..LoadOptions::cpu_f32()
    };
    for (qtype, tied) in [(GgmlDType::Q4_1, false), (GgmlDType::Q8_0, true)] {
        let spec = TinySpec {
            hidden: 128,
            intermediate: 192,
            heads: 4,
            kv_heads: 2,
            tied,
            ..TinySpec::default()
        };
        let path = dir.path().join(format!("tiny-{qtype:?}.gguf"));
        write_gguf(&path, &spec, &tiny_weights(&spec, 5), qtype, "llama");
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
            for step in 0..40 {
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
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                worst = worst.max(diff / scale);
                assert!(
                    diff <= 5e-3 * scale,
                    "{qtype:?}, adapter {with_adapter}, step {step}: logits differ by {diff} \
                     (largest {scale})"
                );
                next = argmax(&want);
            }
            eprintln!("{qtype:?} adapter {with_adapter}: worst relative difference {worst:.2e}");
        }
    }
}
