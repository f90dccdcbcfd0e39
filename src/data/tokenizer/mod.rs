//! The model's tokenizer with what surrounds it: special tokens, the chat template and the set
//! of end tokens, from a Hugging Face directory or from GGUF metadata.

pub mod gguf;

use crate::weights::GgufFile;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {}: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("{}: no tokenizer.json found; your_ai needs the fast (tokenizer.json) tokenizer", dir.display())]
    Missing { dir: PathBuf },
    #[error("{file}: cannot build a tokenizer from GGUF metadata: {reason}")]
    Gguf { file: String, reason: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Byte range `[start, end)` of a token in the text it came from.
pub type ByteSpan = (usize, usize);

/// End-of-turn markers of common chat formats; those present in the vocabulary stop generation.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether plain text gets the BOS token prepended (Llama does, ChatML models do not).
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// Every id that ends generation.
    pub end_ids: BTreeSet<u32>,
    /// Bytes of the longest token's text, computed when first asked.
    max_token_bytes: std::sync::OnceLock<usize>,
    /// A copy that encodes special tokens' text as text, made when first needed.
    plain: std::sync::OnceLock<tokenizers::Tokenizer>,
    /// The special tokens' texts, listed when first asked.
    special_texts: std::sync::OnceLock<Vec<String>>,
    /// Each token's text as it reads in a reply, made when first asked.
    token_texts: std::sync::OnceLock<Vec<Option<String>>>,
}

impl Tokenizer {
    /// From `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` in a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path, config_eos: &[u32]) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?;
        let token_str = |key: &str| -> Option<String> {
            match tc.as_ref()?.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_str("bos_token");
        let eos_token = token_str("eos_token");
        let mut chat_template = match tc.as_ref().and_then(|t| t.get("chat_template")) {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            chat_template =
                Some(
                    std::fs::read_to_string(&jinja).map_err(|e| TokenizerError::Load {
                        path: jinja.clone(),
                        reason: e.to_string(),
                    })?,
                );
        }
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let add_bos = match tc
            .as_ref()
            .and_then(|t| t.get("add_bos_token"))
            .and_then(Value::as_bool)
        {
            Some(b) => b,
            // No explicit setting: does the tokenizer's own post-processor add it?
            None => match (bos_id, inner.encode("a", true)) {
                (Some(id), Ok(enc)) => enc.get_ids().first() == Some(&id),
                _ => false,
            },
        };
        let mut end_ids: BTreeSet<u32> = config_eos.iter().copied().collect();
        if let Some(gc) = read_json(&dir.join("generation_config.json"))? {
            match gc.get("eos_token_id") {
                Some(Value::Number(n)) => end_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Value::Array(a)) => {
                    end_ids.extend(a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)))
                }
                _ => {}
            }
        }
        let mut tok = Self {
            inner,
            bos_token,
            eos_token,
            add_bos,
            chat_template,
            end_ids,
            max_token_bytes: Default::default(),
            plain: Default::default(),
            special_texts: Default::default(),
            token_texts: Default::default(),
        };
        tok.finish_end_ids();
        Ok(tok)
    }

    /// From the `tokenizer.*` metadata of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let doc = gguf::tokenizer_json(g)?;
        let bytes = serde_json::to_vec(&doc).map_err(|e| TokenizerError::Gguf {
            file: g.path.display().to_string(),
            reason: e.to_string(),
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Gguf {
            file: g.path.display().to_string(),
            reason: e.to_string(),
        })?;
        let id = |key: &str| g.metadata(key).and_then(|v| v.to_u32().ok());
        let token = |i: Option<u32>| i.and_then(|i| inner.id_to_token(i));
        let bos_token = token(id("tokenizer.ggml.bos_token_id"));
        let eos_token = token(id("tokenizer.ggml.eos_token_id"));
        let is_spm = g.meta_str("tokenizer.ggml.model") == Some("llama");
        let add_bos = match g.metadata("tokenizer.ggml.add_bos_token") {
            Some(v) => v.to_bool().unwrap_or(is_spm),
            None => is_spm,
        };
        let end_ids = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| id(k))
        .collect();
        let mut tok = Self {
            inner,
            bos_token,
            eos_token,
            add_bos,
            chat_template: g.meta_str("tokenizer.chat_template").map(str::to_string),
            end_ids,
            max_token_bytes: Default::default(),
            plain: Default::default(),
            special_texts: Default::default(),
            token_texts: Default::default(),
        };
        tok.finish_end_ids();
        Ok(tok)
    }

    /// Adds the eos token and the chat format's end-of-turn token to the end ids.
    fn finish_end_ids(&mut self) {
        if let Some(id) = self
            .eos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
        {
            self.end_ids.insert(id);
        }
        if let Some(tpl) = &self.chat_template {
            for t in END_OF_TURN_TOKENS {
                if tpl.contains(t) {
                    if let Some(id) = self.inner.token_to_id(t) {
                        self.end_ids.insert(id);
                    }
                }
            }
        }
    }

    /// An upper bound on the bytes of text one token covers: the longest token's text (a
    /// byte-level or byte-fallback token's text is longer than the bytes it stands for).
    pub fn max_token_bytes(&self) -> usize {
        *self.max_token_bytes.get_or_init(|| {
            self.inner
                .get_vocab(true)
                .keys()
                .map(String::len)
                .max()
                .unwrap_or(1)
                .max(4)
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id` (a special token's text, or a byte-level piece as stored).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are recognised;
    /// no BOS is added (see [`Tokenizer::encode_with_bos`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_offsets(text)?.0)
    }

    /// Ids and byte spans of `text`, the `plain` ranges (in order, apart) encoded as plain text:
    /// a special token's text there (`<|im_end|>` typed by a user) is the characters it is, not
    /// the control token. With no ranges, [`Tokenizer::encode_offsets`].
    pub fn encode_mixed(
        &self,
        text: &str,
        plain: &[std::ops::Range<usize>],
    ) -> Result<(Vec<u32>, Vec<ByteSpan>), TokenizerError> {
        if plain.is_empty() {
            return self.encode_offsets(text);
        }
        let as_text = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let (mut ids, mut offsets) = (vec![], vec![]);
        let mut piece = |range: std::ops::Range<usize>, t: &tokenizers::Tokenizer| {
            if range.is_empty() {
                return Ok(());
            }
            let enc = t
                .encode(&text[range.clone()], false)
                .map_err(|e| TokenizerError::Encode(e.to_string()))?;
            ids.extend_from_slice(enc.get_ids());
            let at = range.start;
            offsets.extend(enc.get_offsets().iter().map(|&(s, e)| (s + at, e + at)));
            Ok(())
        };
        let mut done = 0;
        for r in plain {
            piece(done..r.start, &self.inner)?;
            piece(r.clone(), as_text)?;
            done = r.end;
        }
        piece(done..text.len(), &self.inner)?;
        Ok((ids, offsets))
    }

    /// The text of every special token (control tokens such as `<|im_end|>`), none empty.
    pub fn special_texts(&self) -> &[String] {
        self.special_texts.get_or_init(|| {
            self.inner
                .get_added_tokens_decoder()
                .into_values()
                .filter(|t| t.special && !t.content.is_empty())
                .map(|t| t.content)
                .collect()
        })
    }

    /// Each id's text as it reads inside a reply (None for special tokens): decoded after
    /// another token, since decoders drop a leading space at the start of a text. A token
    /// holding part of a character reads as U+FFFD.
    pub fn token_texts(&self) -> &[Option<String>] {
        self.token_texts.get_or_init(|| {
            let anchor = self.inner.token_to_id("a").or_else(|| {
                let enc = self.inner.encode("a", false).ok()?;
                enc.get_ids().first().copied()
            });
            let anchor_text = anchor.and_then(|a| self.inner.decode(&[a], false).ok());
            let special: BTreeSet<u32> = self
                .inner
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, t)| t.special)
                .map(|(id, _)| id)
                .collect();
            (0..self.vocab_size() as u32)
                .map(|id| {
                    if special.contains(&id) {
                        return None;
                    }
                    let after = match (anchor, &anchor_text) {
                        (Some(a), Some(at)) => self
                            .inner
                            .decode(&[a, id], false)
                            .ok()
                            .and_then(|t| t.strip_prefix(at.as_str()).map(str::to_string)),
                        _ => None,
                    };
                    after.or_else(|| self.inner.decode(&[id], false).ok())
                })
                .collect()
        })
    }

    /// Ids and the byte span of `text` each token came from.
    pub fn encode_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>), TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// As [`Tokenizer::encode`], with the BOS token first when the model expects one.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.encode(text)?;
        if self.add_bos {
            if let Some(b) = self.bos_id() {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn is_end(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })
}

/// Turns a growing list of generated ids into text pieces, holding back bytes that do not yet
/// form a whole UTF-8 character.
///
/// Only a window of the ids is decoded each token: the last piece's ids, for context (a
/// decoder may read a token differently at the start of a text, dropping its leading space),
/// and those after it. Decoding every id each token made a long reply quadratic.
pub struct StreamDecoder {
    /// The window: `ids[..read]` gave the text already emitted, `ids[read..]` is new.
    ids: Vec<u32>,
    read: usize,
    /// Bytes of the window's decoding already emitted.
    emitted: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self {
            ids: vec![],
            read: 0,
            emitted: 0,
        }
    }

    /// Adds a token; returns the newly completed text, if any: everything up to the bytes of
    /// a character not yet whole (which decode as U+FFFD until it is).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        let whole = text.trim_end_matches('\u{FFFD}').len();
        let piece = self.take(&text, whole);
        if whole == text.len() && self.emitted == text.len() {
            // All of the window is out: the ids just read become the next one's context.
            self.ids.drain(..self.read);
            self.read = self.ids.len();
            self.emitted = tok.decode(&self.ids, true)?.len();
        }
        Ok(piece)
    }

    /// At the end of the reply: what is still held back (bytes of a character it ended
    /// inside, as U+FFFD), if anything.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let text = tok.decode(&self.ids, true)?;
        Ok(self.take(&text, text.len()))
    }

    fn take(&mut self, text: &str, end: usize) -> Option<String> {
        if end <= self.emitted || !text.is_char_boundary(self.emitted) {
            return None;
        }
        let piece = text[self.emitted..end].to_string();
        self.emitted = end;
        Some(piece)
    }
}
