//! `tokenizer.ggml.*` metadata for a GGUF export: copied verbatim from a GGUF base, or derived
//! from a Hugging Face `tokenizer.json` — the reverse of `tokenizer::gguf`, which builds a
//! tokenizer.json from GGUF metadata.

use super::merge::Base;
use crate::data::tokenizer::gguf::pre_tokenizer_regexes;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::weights::WeightStore;
use candle_core::quantized::gguf_file::Value as GValue;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;
const TYPE_BYTE: i32 = 6;

/// The tokenizer metadata entries for the base model's tokenizer.
pub fn metadata(base: &Base) -> Result<Vec<(String, GValue)>> {
    match &base.store {
        WeightStore::Gguf(g) => {
            let mut out: Vec<(String, GValue)> = g
                .content
                .metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            // In key order: the metadata map has none, and the same fuse should write the
            // same bytes.
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        }
        WeightStore::Safetensors(_) => from_hf_dir(
            base.source.path(),
            base.cfg.vocab_size,
            &base.cfg.eos_token_ids,
        ),
    }
}

/// Derives GGUF tokenizer metadata from a Hugging Face directory's tokenizer files.
pub fn from_hf_dir(
    dir: &Path,
    vocab_size: usize,
    config_eos: &[u32],
) -> Result<Vec<(String, GValue)>> {
    let path = dir.join("tokenizer.json");
    let bad = |reason: String| {
        Error::Export(format!(
            "{}: cannot write this tokenizer into GGUF: {reason}",
            path.display()
        ))
    };
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
    let doc: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let model = &doc["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "model type {} is not supported (byte-level BPE and SentencePiece-style BPE are)",
            model["type"]
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("`model.vocab` is missing".into()))?;
    // Every id up to the model's vocabulary size gets a token; unnamed ids (padding rows of
    // the embedding) get placeholders, as llama.cpp's converter does.
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TYPE_NORMAL; vocab_size];
    let mut put = |id: u64, tok: &str| -> Result<usize> {
        let id = id as usize;
        if id >= tokens.len() {
            return Err(bad(format!(
                "token `{tok}` has id {id}, beyond the model's vocabulary of {vocab_size}"
            )));
        }
        tokens[id] = Some(tok.to_string());
        Ok(id)
    };
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("token `{tok}` has no integer id")))?;
        put(id, tok)?;
    }
    let mut added_ids = vec![];
    if let Some(added) = doc["added_tokens"].as_array() {
        for a in added {
            let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
                return Err(bad("an entry of `added_tokens` lacks id or content".into()));
            };
            let id = put(id, content)?;
            added_ids.push((id, a["special"].as_bool().unwrap_or(false)));
        }
    }
    let byte_level =
        mentions_byte_level(&doc["pre_tokenizer"]) || mentions_byte_level(&doc["decoder"]);
    let spm = !byte_level && model["byte_fallback"].as_bool() == Some(true);
    if !byte_level && !spm {
        return Err(bad(
            "neither byte-level BPE nor SentencePiece BPE with byte fallback".into(),
        ));
    }
    for (id, special) in &added_ids {
        types[*id] = if *special {
            TYPE_CONTROL
        } else {
            TYPE_USER_DEFINED
        };
    }
    let merges =
        merges(&model["merges"]).ok_or_else(|| bad("`model.merges` is malformed".into()))?;
    let mut out: Vec<(String, GValue)> = vec![];
    if spm {
        let unk = model["unk_token"].as_str();
        for (id, t) in tokens.iter().enumerate() {
            match t.as_deref() {
                Some(s) if Some(s) == unk => types[id] = TYPE_UNKNOWN,
                Some(s) if is_byte_token(s) => types[id] = TYPE_BYTE,
                _ => {}
            }
        }
        // SentencePiece GGUFs carry scores, not merges; the reader ranks merges by the score of
        // the merged token, so the rank of the merge that first produces a token becomes its score.
        let index: HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_deref().map(|t| (t, i)))
            .collect();
        let mut scores = vec![f32::NAN; vocab_size];
        for (rank, m) in merges.iter().enumerate() {
            if let Some((l, r)) = m.split_once(' ') {
                if let Some(&id) = index.get(format!("{l}{r}").as_str()) {
                    if scores[id].is_nan() {
                        scores[id] = -(rank as f32);
                    }
                }
            }
        }
        let floor = -(merges.len() as f32) - 1.0;
        let scores: Vec<GValue> = scores
            .into_iter()
            .map(|s| GValue::F32(if s.is_nan() { floor } else { s }))
            .collect();
        out.push((
            "tokenizer.ggml.model".into(),
            GValue::String("llama".into()),
        ));
        out.push(("tokenizer.ggml.scores".into(), GValue::Array(scores)));
        if let Some(id) = unk.and_then(|u| index.get(u)) {
            out.push((
                "tokenizer.ggml.unknown_token_id".into(),
                GValue::U32(*id as u32),
            ));
        }
        let prepends = doc["normalizer"].to_string().contains("Prepend");
        out.push((
            "tokenizer.ggml.add_space_prefix".into(),
            GValue::Bool(prepends),
        ));
    } else {
        out.push(("tokenizer.ggml.model".into(), GValue::String("gpt2".into())));
        out.push((
            "tokenizer.ggml.pre".into(),
            GValue::String(pre_name(&doc["pre_tokenizer"])),
        ));
        out.push((
            "tokenizer.ggml.merges".into(),
            GValue::Array(merges.into_iter().map(GValue::String).collect()),
        ));
    }
    let tokens: Vec<GValue> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            GValue::String(t.unwrap_or_else(|| {
                types[i] = TYPE_UNUSED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    out.insert(1, ("tokenizer.ggml.tokens".into(), GValue::Array(tokens)));
    out.insert(
        2,
        (
            "tokenizer.ggml.token_type".into(),
            GValue::Array(types.into_iter().map(GValue::I32).collect()),
        ),
    );
    // Special tokens, BOS handling and the chat template as our own loader reads them.
    let tok = Tokenizer::from_hf_dir(dir, config_eos)?;
    if let Some(id) = tok.bos_id() {
        out.push(("tokenizer.ggml.bos_token_id".into(), GValue::U32(id)));
    }
    let eos = tok
        .eos_token
        .as_deref()
        .and_then(|t| tok.token_to_id(t))
        .or_else(|| config_eos.first().copied());
    if let Some(id) = eos {
        out.push(("tokenizer.ggml.eos_token_id".into(), GValue::U32(id)));
    }
    // Padding (and, for byte-level BPE, which has none in its model, unknown) by the names
    // tokenizer_config.json gives them, as llama.cpp's converter reads them.
    let config = read_config(&dir.join("tokenizer_config.json"));
    let named = |name: &str| {
        let v = &config[name];
        v.as_str()
            .or_else(|| v["content"].as_str())
            .and_then(|t| tok.token_to_id(t))
    };
    if let Some(id) = named("pad_token") {
        out.push(("tokenizer.ggml.padding_token_id".into(), GValue::U32(id)));
    }
    let has_unk = out
        .iter()
        .any(|(k, _)| k == "tokenizer.ggml.unknown_token_id");
    if let Some(id) = named("unk_token").filter(|_| !has_unk) {
        out.push(("tokenizer.ggml.unknown_token_id".into(), GValue::U32(id)));
    }
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        GValue::Bool(tok.add_bos),
    ));
    out.push(("tokenizer.ggml.add_eos_token".into(), GValue::Bool(false)));
    if let Some(t) = tok.chat_template {
        out.push(("tokenizer.chat_template".into(), GValue::String(t)));
    }
    Ok(out)
}

/// tokenizer_config.json's fields (null where the file is absent or unreadable: its special
/// tokens are then unnamed, as without the file).
fn read_config(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn mentions_byte_level(v: &Value) -> bool {
    v.to_string().contains("\"ByteLevel\"")
}

fn is_byte_token(s: &str) -> bool {
    s.len() == 6 && s.starts_with("<0x") && s.ends_with('>')
}

/// Merges as "left right" strings; tokenizer.json has either that form or `[left, right]` pairs.
fn merges(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Null => Some(vec![]),
        Value::Array(a) => a
            .iter()
            .map(|m| match m {
                Value::String(s) => Some(s.clone()),
                Value::Array(p) if p.len() == 2 => {
                    Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                }
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// llama.cpp's `tokenizer.ggml.pre` name for the split regexes of a byte-level pre-tokenizer.
fn pre_name(pre: &Value) -> String {
    let mut found: Vec<String> = vec![];
    collect_splits(pre, &mut found);
    if found.is_empty() {
        // A bare ByteLevel pre-tokenizer applies GPT-2's regex itself.
        return "gpt-2".into();
    }
    for name in ["llama-bpe", "qwen2", "smollm", "gpt-2"] {
        if let Some(r) = pre_tokenizer_regexes(name) {
            if r.iter().map(|s| s.to_string()).collect::<Vec<_>>() == found {
                return name.into();
            }
        }
    }
    tracing::warn!(
        "unrecognised pre-tokenizer regexes {found:?}; writing tokenizer.ggml.pre = default"
    );
    "default".into()
}

fn collect_splits(v: &Value, out: &mut Vec<String>) {
    match v["type"].as_str() {
        Some("Sequence") => {
            if let Some(items) = v["pretokenizers"].as_array() {
                for i in items {
                    collect_splits(i, out);
                }
            }
        }
        Some("Split") => {
            if let Some(r) = v["pattern"]["Regex"].as_str() {
                out.push(r.to_string());
            }
        }
        _ => {}
    }
}
