//! Builds a Hugging Face `tokenizer.json` from GGUF `tokenizer.ggml.*` metadata, so that GGUF
//! models tokenize with the same `tokenizers` machinery as Hugging Face directories.
//!
//! Byte-level BPE (`gpt2`) takes its pre-tokenizer regexes from `tokenizer.ggml.pre`, the same
//! table llama.cpp uses; SentencePiece BPE (`llama`) gets its merges back from the token scores.

use super::TokenizerError;
use crate::weights::GgufFile;
use candle_core::quantized::gguf_file::Value as GValue;
use serde_json::{json, Value};
use std::collections::HashMap;

/// GPT-2's split: contractions, letters, digits, other symbols, whitespace.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split (also used by many later byte-level BPE models).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: as Llama 3 but single digits.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes applied in order for a `tokenizer.ggml.pre` value, or `None` when unknown.
pub fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "olmo" | "jais" | "phi-2" | "stablelm2" | "poro-chat"
        | "viking" => {
            vec![GPT2]
        }
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "falcon3" | "pixtral" | "dbrx" => {
            vec![LLAMA3]
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm3" | "megrez" => vec![QWEN2],
        // SmolLM, StarCoder and relatives: digits one by one, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2]
        }
        _ => return None,
    })
}

const TYPE_NORMAL: i64 = 1;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// Assembles the `tokenizer.json` document for the GGUF's tokenizer.
pub fn tokenizer_json(g: &GgufFile) -> Result<Value, TokenizerError> {
    let src = g.path.display().to_string();
    let bad = |reason: String| TokenizerError::Gguf {
        file: src.clone(),
        reason,
    };
    let model = g
        .meta_str("tokenizer.ggml.model")
        .ok_or_else(|| bad("metadata `tokenizer.ggml.model` is missing".into()))?
        .to_string();
    let tokens = string_array(g, "tokenizer.ggml.tokens")
        .ok_or_else(|| bad("metadata `tokenizer.ggml.tokens` is missing".into()))?;
    let types: Vec<i64> = int_array(g, "tokenizer.ggml.token_type")
        .unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(bad(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut added = vec![];
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        if *ty == TYPE_CONTROL || *ty == TYPE_USER_DEFINED {
            added.push(
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == TYPE_CONTROL}),
            );
        }
    }
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    match model.as_str() {
        "gpt2" => {
            let merges = string_array(g, "tokenizer.ggml.merges").ok_or_else(|| bad("metadata `tokenizer.ggml.merges` is missing".into()))?;
            let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
            let regexes = match pre_tokenizer_regexes(pre) {
                Some(r) => r,
                None => {
                    tracing::warn!("{src}: unknown tokenizer.ggml.pre `{pre}`; using GPT-2's pre-tokenizer");
                    vec![GPT2]
                }
            };
            let mut pretok: Vec<Value> = regexes
                .iter()
                .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
                .collect();
            pretok.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretok},
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                    "ignore_merges": regexes == [LLAMA3], "vocab": vocab, "merges": merges}
            }))
        }
        "llama" => {
            let scores = float_array(g, "tokenizer.ggml.scores").ok_or_else(|| bad("metadata `tokenizer.ggml.scores` is missing".into()))?;
            if scores.len() != tokens.len() {
                return Err(bad(format!("{} scores for {} tokens", scores.len(), tokens.len())));
            }
            let merges = merges_from_scores(&tokens, &types, &scores);
            let unk = g
                .metadata("tokenizer.ggml.unknown_token_id")
                .and_then(|v| v.to_u32().ok())
                .and_then(|i| tokens.get(i as usize).cloned());
            let prefix = !matches!(g.metadata("tokenizer.ggml.add_space_prefix"), Some(GValue::Bool(false)));
            let mut norm = vec![];
            if prefix {
                norm.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
            let mut dec = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": norm},
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": dec},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                    "ignore_merges": false, "vocab": vocab, "merges": merges}
            }))
        }
        other => Err(bad(format!(
            "tokenizer model `{other}` is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)"
        ))),
    }
}

/// SentencePiece BPE stores scores, not merges: every normal token that splits into two known
/// pieces is a merge, ranked by the merged token's score (higher first), as Hugging Face's
/// converter does.
fn merges_from_scores(tokens: &[String], types: &[i64], scores: &[f32]) -> Vec<String> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, String)> = vec![];
    for (id, tok) in tokens.iter().enumerate() {
        if types[id] != TYPE_NORMAL && types[id] != TYPE_USER_DEFINED {
            continue;
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                if types[li] == TYPE_BYTE || types[ri] == TYPE_BYTE {
                    continue;
                }
                merges.push((scores[id], li, ri, format!("{l} {r}")));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|m| m.3).collect()
}

fn string_array(g: &GgufFile, key: &str) -> Option<Vec<String>> {
    match g.metadata(key)? {
        GValue::Array(a) => a.iter().map(|v| v.to_string().ok().cloned()).collect(),
        _ => None,
    }
}

fn int_array(g: &GgufFile, key: &str) -> Option<Vec<i64>> {
    match g.metadata(key)? {
        GValue::Array(a) => a
            .iter()
            .map(|v| match v {
                GValue::I32(x) => Some(*x as i64),
                GValue::U32(x) => Some(*x as i64),
                GValue::I64(x) => Some(*x),
                GValue::U8(x) => Some(*x as i64),
                GValue::I8(x) => Some(*x as i64),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn float_array(g: &GgufFile, key: &str) -> Option<Vec<f32>> {
    match g.metadata(key)? {
        GValue::Array(a) => a.iter().map(|v| v.to_f32().ok()).collect(),
        _ => None,
    }
}
