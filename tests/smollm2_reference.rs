//! SmolLM2 against independent references recorded by scripts/reference/smollm2_reference.py:
//! token ids from llama.cpp's `smollm` pre-tokenizer, and logits, greedy tokens and losses from
//! transformers' own GGUF loader (which dequantizes to f32 as we do).

mod common;

use candle_core::{Device, Tensor};
use serde_json::Value;
use your_ai::model::KvCache;

fn fixture() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn smollm2_model() -> (your_ai::model::Llama, your_ai::data::tokenizer::Tokenizer) {
    let path = common::smollm2();
    let opts = your_ai::model::LoadOptions::cpu_f32();
    let m = your_ai::model::load(path.to_str().unwrap(), &opts, None).unwrap();
    (m.model, m.tokenizer)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let f = fixture();
    let (_, tok) = smollm2_model();
    for case in f["tokenization"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids_llamacpp_smollm"]);
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text, "decode {text:?}");
    }
}

#[test]
fn logits_greedy_and_loss_match_transformers() {
    let f = fixture();
    let (model, _) = smollm2_model();
    let prompt = ids(&f["logits"]["ids"]);
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = model
        .forward(&input, &mut KvCache::new(30))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let last = &f["logits"]["last"];
    let row = &logits[last["position"].as_u64().unwrap() as usize];
    for (i, want) in last["first32"].as_array().unwrap().iter().enumerate() {
        let want = want.as_f64().unwrap();
        assert!(
            (row[i] as f64 - want).abs() < 2e-3,
            "logit {i}: {} vs {want}",
            row[i]
        );
    }
    for pair in last["top10"].as_array().unwrap() {
        let (id, want) = (
            pair[0].as_u64().unwrap() as usize,
            pair[1].as_f64().unwrap(),
        );
        assert!(
            (row[id] as f64 - want).abs() < 2e-3,
            "top logit {id}: {} vs {want}",
            row[id]
        );
    }
    // Greedy continuation, token for token.
    let want = ids(&f["greedy"]["ids"]);
    let mut cache = KvCache::new(30);
    let mut x = input;
    let mut got = vec![];
    for _ in 0..want.len() {
        let l = model.forward(&x, &mut cache).unwrap();
        let t = l.dim(1).unwrap();
        let next = l
            .narrow(1, t - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        got.push(next);
        x = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
    }
    assert_eq!(got, want);
}

#[test]
fn losses_match_transformers() {
    let f = fixture();
    let (model, _) = smollm2_model();
    let all = ids(&f["loss"]["ids"]);
    let range = f["loss"]["answer_target_range"].as_array().unwrap();
    let (a0, a1) = (
        range[0].as_u64().unwrap() as usize,
        range[1].as_u64().unwrap() as usize,
    );
    let whole = your_ai::data::Sample {
        ids: all.clone(),
        trained: vec![true; all.len()],
        truncated: 0,
        untrained_turns: 0,
    };
    let answer = your_ai::data::Sample {
        trained: (0..all.len()).map(|i| (a0..a1).contains(&i)).collect(),
        ..whole.clone()
    };
    let r = your_ai::infer::eval::evaluate(&model, &[whole], 1).unwrap();
    assert_eq!(r.tokens, f["loss"]["n_all"].as_u64().unwrap() as usize);
    assert!(
        (r.loss - f["loss"]["mean_all"].as_f64().unwrap()).abs() < 1e-3,
        "{}",
        r.loss
    );
    let r = your_ai::infer::eval::evaluate(&model, &[answer], 1).unwrap();
    assert_eq!(r.tokens, f["loss"]["n_answer"].as_u64().unwrap() as usize);
    assert!(
        (r.loss - f["loss"]["mean_answer"].as_f64().unwrap()).abs() < 1e-3,
        "{}",
        r.loss
    );
}
