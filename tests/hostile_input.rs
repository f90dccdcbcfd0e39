//! Hostile input never panics: thousands of random and mutated JSONL lines, GGUF files and
//! safetensors files go through the readers; every one either loads or gives an error.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::{tiny_weights, write_gguf, write_hf_dir, TinySpec};
use rand::{Rng, SeedableRng};
use your_ai::model::{Llama, ModelConfig};
use your_ai::weights::{GgufFile, SafetensorsDir, WeightStore};

/// Fixed seeds keep CI reproducible; `HOSTILE_SEED=n` explores others.
fn seeded(base: u64) -> rand::rngs::StdRng {
    let extra: u64 = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    rand::rngs::StdRng::seed_from_u64(base ^ extra.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

const JSON_PIECES: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"messages\"",
    "\"role\"",
    "\"content\"",
    "\"text\"",
    "\"prompt\"",
    "\"completion\"",
    "\"tools\"",
    "\"user\"",
    "\"assistant\"",
    "\"system\"",
    "\"wizard\"",
    ":",
    ",",
    "null",
    "true",
    "1e999",
    "-0",
    "\"é\u{1F600}\"",
    "\"\\ud800\"",
    "\"\\u0000\"",
    " ",
    "\n",
];

#[test]
fn random_jsonl_lines_never_panic() {
    let mut rng = seeded(1);
    let mut errors = 0;
    for i in 0..20_000 {
        let line: String = if i % 3 == 0 {
            // Arbitrary Unicode.
            (0..rng.random_range(0..64))
                .map(|_| char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('?'))
                .collect()
        } else {
            (0..rng.random_range(1..40))
                .map(|_| JSON_PIECES[rng.random_range(0..JSON_PIECES.len())])
                .collect()
        };
        if let Err(e) = your_ai::data::parse_line(&line) {
            assert!(!e.is_empty());
            errors += 1;
        }
    }
    assert!(errors > 0);
    // Deep nesting is an error, not a stack overflow.
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    assert!(your_ai::data::parse_line(&deep).is_err());
    let deep = format!(
        "{{\"text\": {}1{}}}",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    assert!(your_ai::data::parse_line(&deep).is_err());
}

fn try_load_gguf(path: &std::path::Path) {
    let Ok(g) = GgufFile::open(path) else { return };
    let _ = your_ai::data::tokenizer::Tokenizer::from_gguf(&g);
    let Ok(cfg) = g.config() else { return };
    let _ = Llama::load(&WeightStore::Gguf(g), cfg, DType::F32, &Device::Cpu);
}

#[test]
fn mutated_gguf_files_never_panic() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(
        &good,
        &spec,
        &tiny_weights(&spec, 1),
        GgmlDType::Q8_0,
        "llama",
    );
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("bad.gguf");
    let mut rng = seeded(2);
    for trial in 0..1500 {
        let mut b = bytes.clone();
        match trial % 3 {
            // Flip bytes in the header (counts, lengths, types, dims, offsets).
            0 | 1 => {
                for _ in 0..rng.random_range(1..6) {
                    let at = rng.random_range(0..b.len().min(6000));
                    b[at] = rng.random();
                }
            }
            // Truncate anywhere.
            _ => b.truncate(rng.random_range(0..b.len())),
        }
        std::fs::write(&bad, &b).unwrap();
        try_load_gguf(&bad);
    }
}

#[test]
fn mutated_safetensors_and_configs_never_panic() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(dir.path(), &spec, &tiny_weights(&spec, 1), DType::F32);
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let mut rng = seeded(3);
    for trial in 0..1500 {
        let mut b = bytes.clone();
        let header_len = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..header_len.min(b.len()));
            b[at] = rng.random();
        }
        if trial % 4 == 0 {
            b.truncate(rng.random_range(0..b.len()));
        }
        std::fs::write(&st, &b).unwrap();
        // Mutated config values too: numbers replaced by random ones.
        let mut c = config.clone();
        if trial % 2 == 0 {
            let v: i64 = rng.random_range(-3..5000);
            c = c.replacen(&spec.hidden.to_string(), &v.to_string(), 1);
        }
        std::fs::write(dir.path().join("config.json"), c).unwrap();
        let Ok(cfg) = ModelConfig::from_hf_file(&dir.path().join("config.json")) else {
            continue;
        };
        let Ok(store) = SafetensorsDir::open(dir.path()) else {
            continue;
        };
        let _ = Llama::load(
            &WeightStore::Safetensors(store),
            cfg,
            DType::F32,
            &Device::Cpu,
        );
    }
}

/// A chat template that keeps doubling a string, met on line 2 of the training data: the
/// command says which file and line and why, and exits non-zero; the process is not killed.
#[test]
fn a_template_that_exhausts_memory_is_a_clear_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_chat_model(&dir.path().join("model"));
    std::fs::write(
        model.join("chat_template.jinja"),
        "{% set ns = namespace(s='ab') %}{% for m in messages %}{% if m.content == 'boom' %}\
         {% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{% endif %}\
         <|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    )
    .unwrap();
    let data = common::write_chat_data(&dir.path().join("data"), 4);
    let lines = std::fs::read_to_string(data.join("train.jsonl")).unwrap();
    let mut lines: Vec<&str> = lines.lines().collect();
    let boom = r#"{"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "ok"}]}"#;
    lines[1] = boom;
    std::fs::write(data.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_your_ai"))
        .env_remove("RUST_LOG")
        .args(["train", "--max-steps", "1", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("train.jsonl:2:"), "{err}");
    assert!(err.contains("needed more than 2 GiB of memory"), "{err}");
}
