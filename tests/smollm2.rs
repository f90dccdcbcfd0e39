//! The real test model, SmolLM2-135M-Instruct (Q4_1 GGUF), through the library and the CLI.

mod common;

use common::{cli, smollm2};
use predicates::prelude::*;
use serde_json::json;
use your_ai::data::chat_template::{ChatContext, ChatTemplate};
use your_ai::data::tokenizer::Tokenizer;
use your_ai::weights::GgufFile;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(&smollm2()).unwrap()).unwrap()
}

#[test]
fn greedy_generate_knows_paris_and_stops_at_end_of_turn() {
    cli()
        .args(["generate", "--model"])
        .arg(smollm2())
        .args([
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "64",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("Paris"))
        .stderr(predicate::str::contains("stopped: end of turn"));
}

#[test]
fn two_turn_chat_renders_exactly() {
    let tok = tokenizer();
    let tpl = ChatTemplate::new(tok.chat_template.as_deref().unwrap()).unwrap();
    let messages = [
        json!({"role": "user", "content": "Hi"}),
        json!({"role": "assistant", "content": "Hello! How can I help?"}),
        json!({"role": "user", "content": "Name a colour."}),
    ];
    let out = tpl
        .render(&ChatContext {
            messages: &messages,
            add_generation_prompt: true,
            bos_token: tok.bos_token.as_deref(),
            eos_token: tok.eos_token.as_deref(),
            ..Default::default()
        })
        .unwrap();
    // From the template's definition: a default system turn when none is given, then each
    // message as <|im_start|>role\ncontent<|im_end|>\n, then the generation prompt.
    let expected = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                    <|im_start|>user\nHi<|im_end|>\n\
                    <|im_start|>assistant\nHello! How can I help?<|im_end|>\n\
                    <|im_start|>user\nName a colour.<|im_end|>\n\
                    <|im_start|>assistant\n";
    assert_eq!(out, expected);
}

#[test]
fn end_tokens_include_im_end() {
    let tok = tokenizer();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert!(tok.is_end(im_end));
    assert_eq!(tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap()[0], 1);
}

#[test]
fn eval_on_a_small_chat_file_gives_a_sensible_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.jsonl");
    let rows = [
        (
            "What is the capital of France?",
            "The capital of France is Paris.",
        ),
        (
            "How many legs does a spider have?",
            "A spider has eight legs.",
        ),
        (
            "What colour is the sky on a clear day?",
            "The sky is blue on a clear day.",
        ),
    ];
    let text: String = rows
        .iter()
        .map(|(q, a)| {
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&data, text).unwrap();
    let out = cli()
        .args(["eval", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(&data)
        .args(["--batch-size", "2"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    let loss: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("loss: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no loss in: {out}"));
    assert!(loss.is_finite() && loss > 0.05 && loss < 4.0, "loss {loss}");
    let tokens: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("tokens: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Assistant answers plus their <|im_end|>: a few dozen tokens, far fewer than the whole chats.
    assert!((20..60).contains(&tokens), "tokens {tokens}");
}

#[test]
fn masking_trains_exactly_every_assistant_turn_with_its_end_token() {
    let tok = tokenizer();
    let line = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye, see you soon."}
    ]})
    .to_string();
    let (example, fields) = your_ai::data::parse_line(&line).unwrap();
    let rec = your_ai::data::Record {
        example,
        location: "test:1".into(),
        fields,
    };
    let enc = your_ai::data::Encoder::new(&tok, true, 1024).unwrap();
    let s = enc.encode(&rec).unwrap();
    // Group consecutive trained tokens into spans and decode each.
    let mut spans = vec![];
    let mut cur: Vec<u32> = vec![];
    for (id, t) in s.ids.iter().zip(&s.trained) {
        if *t {
            cur.push(*id);
        } else if !cur.is_empty() {
            spans.push(tok.decode(&std::mem::take(&mut cur), false).unwrap());
        }
    }
    if !cur.is_empty() {
        spans.push(tok.decode(&cur, false).unwrap());
    }
    assert_eq!(
        spans,
        vec![
            "Hello!<|im_end|>",
            "4<|im_end|>",
            "Goodbye, see you soon.<|im_end|>"
        ]
    );
    // Without masking, everything is trained.
    let all = your_ai::data::Encoder::new(&tok, false, 1024)
        .unwrap()
        .encode(&rec)
        .unwrap();
    assert!(all.trained.iter().all(|t| *t));
    // Truncation is counted.
    let short = your_ai::data::Encoder::new(&tok, true, 10)
        .unwrap()
        .encode(&rec)
        .unwrap();
    assert_eq!(short.ids.len(), 10);
    assert_eq!(short.truncated, s.ids.len() - 10);
    // Content as OpenAI's list of text parts (each message cut in two) is the same example.
    let mut parts: serde_json::Value = serde_json::from_str(&line).unwrap();
    for m in parts["messages"].as_array_mut().unwrap() {
        let text = m["content"].as_str().unwrap().to_string();
        let (a, b) = text.split_at(text.len() / 2);
        m["content"] = json!([{"type": "text", "text": a}, {"type": "text", "text": b}]);
    }
    let (example, fields) = your_ai::data::parse_line(&parts.to_string()).unwrap();
    let rec = your_ai::data::Record {
        example,
        location: "test:2".into(),
        fields,
    };
    let from_parts = enc.encode(&rec).unwrap();
    assert_eq!((from_parts.ids, from_parts.trained), (s.ids, s.trained));
    let image = json!({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "A cat."}
    ]});
    let e = your_ai::data::parse_line(&image.to_string()).unwrap_err();
    assert!(
        e.contains("messages[0] (`user`): content part 0 is of type `image_url`"),
        "{e}"
    );
}

/// Decoding reads the GGUF's Q4_1 blocks (the default) or dense dequantized weights
/// (`--dtype f32`), and the default says which it uses. The block path rounds each
/// activation to 8 bits as llama.cpp does, so a near-tie between two tokens can go the other
/// way: the greedy replies agree for their first 20 words (here they part at word 27).
#[test]
fn decoding_from_the_blocks_gives_the_dense_greedy_reply() {
    let run = |extra: &[&str]| {
        let o = cli()
            .args(["generate", "--model"])
            .arg(smollm2())
            .args([
                "--prompt",
                "Tell me a story about a dragon.",
                "--max-tokens",
                "40",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success());
        (
            String::from_utf8(o.stdout).unwrap(),
            String::from_utf8(o.stderr).unwrap(),
        )
    };
    let (fast, note) = run(&[]);
    let (dense, dense_note) = run(&["--dtype", "f32"]);
    assert!(
        note.contains("decoding with the GGUF's own Q4_1 weights"),
        "{note}"
    );
    assert!(
        !dense_note.contains("decoding with the GGUF's own"),
        "{dense_note}"
    );
    let words = |s: &str| {
        s.split_whitespace()
            .take(20)
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(words(&fast).len(), 20, "{fast}");
    assert_eq!(words(&fast), words(&dense), "{fast}\n{dense}");
}

/// On the test model, generation takes decoding's fused token step (`Llama::decode_next`),
/// base and adapter alike: a silent fall back to the tensor path would cost a fifth of the
/// decode rate. (`tests/decoding.rs` holds it to the tensor path's results.)
#[test]
fn generation_takes_the_fused_token_step() {
    use candle_core::{Device, Tensor};
    use your_ai::model::quantized::QuantBits;
    use your_ai::model::{KvCache, LoadOptions};
    let opts = LoadOptions {
        quantize: Some(QuantBits::Four),
        ..LoadOptions::cpu_f32()
    };
    let path = smollm2().to_string_lossy().to_string();
    let mut loaded = your_ai::model::load(&path, &opts, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let adapter = common::random_adapter(&loaded.model.cfg, dir.path(), 0.05, 3);
    let prompt: Vec<u32> = tokenizer().encode("The capital of France is").unwrap();
    for with_adapter in [false, true] {
        loaded.model.adapter = with_adapter.then(|| adapter.clone());
        let m = &loaded.model;
        let mut cache = KvCache::for_decoding(m.blocks.len());
        // Nothing cached yet: the prompt goes through the tensor path.
        assert!(m.decode_next(1, &mut cache).unwrap().is_none());
        let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.forward(&ids, &mut cache).unwrap();
        let logits = m
            .decode_next(1, &mut cache)
            .unwrap()
            .expect("the fused step applies");
        assert_eq!(
            (logits.len(), cache.len()),
            (m.cfg.vocab_size, prompt.len() + 1)
        );
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}
