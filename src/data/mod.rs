//! Datasets: JSONL files in the formats mlx-lm popularised (`text`, `prompt`/`completion`,
//! `messages` with optional `tools`), and their conversion to token ids with a per-token loss
//! mask. Chat and completions are rendered with the model's own chat template; the trained
//! spans are the assistant turns, found from rendering offsets (render the conversation up to
//! the turn with a generation prompt, then including the turn: the difference is the turn),
//! never by searching for token patterns.

pub mod args;
pub mod batch;
pub mod chat_template;
pub mod files;
pub mod message_text;
pub mod preference;
pub mod row_fields;
pub mod tokenizer;

use chat_template::{ChatContext, ChatTemplate};
use message_text::plain_ranges;
use serde_json::{Map, Value};
use std::path::PathBuf;
use tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data path {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("{}: no train.jsonl in this directory (expected train.jsonl, and optionally valid.jsonl and test.jsonl)", dir.display())]
    NoTrainFile { dir: PathBuf },
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: the file holds no examples", path.display())]
    Empty { path: PathBuf },
    #[error("{} invalid line(s):\n{}", count, shown.join("\n"))]
    Invalid { count: usize, shown: Vec<String> },
    #[error("{location}: {reason}")]
    Example { location: String, reason: String },
}

impl DataError {
    /// One error for every bad line or example (`file:line: reason`), the first few listed.
    pub fn invalid(errors: Vec<String>) -> Self {
        let (count, shown) = crate::io::error_list::first_errors(errors);
        DataError::Invalid { count, shown }
    }
}

const KNOWN_ROLES: &[&str] = &[
    "system",
    "user",
    "assistant",
    "tool",
    "ipython",
    "function",
    "developer",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Text(String),
    Completion {
        prompt: String,
        completion: String,
    },
    Chat {
        messages: Vec<Value>,
        tools: Option<Vec<Value>>,
    },
}

/// One example and where it came from.
#[derive(Debug, Clone)]
pub struct Record {
    pub example: Example,
    /// `file:line`, for messages.
    pub location: String,
    /// The whole JSON object, for per-example fields used by later stages.
    pub fields: Map<String, Value>,
}

/// Detects the format from the keys and checks the types.
pub fn parse_line(text: &str) -> Result<(Example, Map<String, Value>), String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(obj) = value else {
        return Err("expected a JSON object, one example per line".into());
    };
    if obj.contains_key("chosen") && obj.contains_key("rejected") {
        return Err(
            "a preference pair (`chosen`, `rejected`), which this command does not take \
                    here: train or evaluate pairs with --method dpo or --method orpo"
                .into(),
        );
    }
    let string = |key: &str| -> Result<String, String> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("`{key}` must be a string, found {}", kind(other))),
            None => Err(format!("`{key}` is missing")),
        }
    };
    let example = if obj.contains_key("messages") {
        let Some(Value::Array(messages)) = obj.get("messages") else {
            return Err("`messages` must be a list of {\"role\", \"content\"} objects".into());
        };
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| check_message("messages", i, m))
            .collect::<Result<Vec<_>, _>>()?;
        if !messages
            .iter()
            .any(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        {
            return Err(
                "the conversation has no assistant turn, so there is nothing to learn from it"
                    .into(),
            );
        }
        let tools = match obj.get("tools") {
            None | Some(Value::Null) => None,
            Some(Value::Array(t)) => Some(t.clone()),
            Some(other) => return Err(format!("`tools` must be a list, found {}", kind(other))),
        };
        Example::Chat { messages, tools }
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        Example::Completion {
            prompt: string("prompt")?,
            completion: string("completion")?,
        }
    } else if obj.contains_key("text") {
        Example::Text(string("text")?)
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(format!(
            "unknown format (keys: {}); expected {{\"text\"}}, {{\"prompt\", \"completion\"}} or {{\"messages\"}}",
            if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
        ));
    };
    Ok((example, obj))
}

/// One chat message (`key[i]`), checked: a known role, and a string `content` (or none beside
/// `tool_calls`). Content given as a list of text parts is returned joined as one string.
pub(crate) fn check_message(key: &str, i: usize, m: &Value) -> Result<Value, String> {
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{key}[{i}] has no string `role`"))?;
    if !KNOWN_ROLES.contains(&role) {
        return Err(format!(
            "{key}[{i}] has unknown role `{role}` (known: {})",
            KNOWN_ROLES.join(", ")
        ));
    }
    let mut m = m.clone();
    match m.get("content") {
        Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            let text = message_text::text_of_parts(parts)
                .map_err(|why| format!("{key}[{i}] (`{role}`): {why}"))?;
            m["content"] = Value::String(text);
        }
        Some(Value::Null) | None if m.get("tool_calls").is_some() => {}
        _ => {
            return Err(format!(
                "{key}[{i}] (`{role}`) needs a string `content` (or a list of text parts)"
            ))
        }
    }
    Ok(m)
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Token ids with, for each token, whether predicting it counts in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    /// Tokens cut off by `max_seq_length`.
    pub truncated: usize,
    /// Assistant turns left untrained: the template renders them differently once later turns
    /// follow (it drops an earlier turn's reasoning, say), so their tokens cannot be located.
    pub untrained_turns: usize,
}

impl Sample {
    pub fn trained_count(&self) -> usize {
        // The first token is never predicted.
        self.trained.iter().skip(1).filter(|t| **t).count()
    }
}

/// Turns records into samples for one model.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Train only assistant turns / completions (default); otherwise every token.
    pub mask_prompt: bool,
    pub max_seq_length: usize,
}

impl<'a> Encoder<'a> {
    pub fn new(
        tokenizer: &'a Tokenizer,
        mask_prompt: bool,
        max_seq_length: usize,
    ) -> Result<Self, crate::data::chat_template::TemplateError> {
        let template = match &tokenizer.chat_template {
            Some(src) => Some(ChatTemplate::new(src)?),
            None => None,
        };
        Ok(Self {
            tokenizer,
            template,
            mask_prompt,
            max_seq_length,
        })
    }

    pub fn encode(&self, rec: &Record) -> Result<Sample, DataError> {
        self.encode_from(rec, 0)
    }

    /// [`Encoder::encode`], training a chat's assistant turns from message `first` on only
    /// (a preference pair's answer after its prompt).
    pub fn encode_from(&self, rec: &Record, first: usize) -> Result<Sample, DataError> {
        let err = |reason: String| DataError::Example {
            location: rec.location.clone(),
            reason,
        };
        let (text, spans, plain, untrained_turns) = match &rec.example {
            Example::Text(t) => {
                let mut text = t.clone();
                if let Some(eos) = &self.tokenizer.eos_token {
                    text.push_str(eos);
                }
                let spans = vec![(0, text.len())];
                // Raw text is the tokenizer's input as it is: control tokens written in it (a
                // conversation templated by hand) are control tokens.
                (text, spans, vec![], 0)
            }
            Example::Completion { prompt, completion } => match &self.template {
                Some(_) => {
                    let messages = vec![
                        serde_json::json!({"role": "user", "content": prompt}),
                        serde_json::json!({"role": "assistant", "content": completion}),
                    ];
                    let r = self.render_chat(&messages, None).map_err(err)?;
                    let spans = r.spans.into_iter().map(|(_, span)| span).collect();
                    (r.text, spans, r.plain, r.untrained_turns)
                }
                None => {
                    let mut text = prompt.clone();
                    let start = text.len();
                    text.push_str(completion);
                    if let Some(eos) = &self.tokenizer.eos_token {
                        text.push_str(eos);
                    }
                    let end = text.len();
                    (text, vec![(start, end)], vec![], 0)
                }
            },
            Example::Chat { messages, tools } => {
                let r = self.render_chat(messages, tools.as_deref()).map_err(err)?;
                let spans = r
                    .spans
                    .into_iter()
                    .filter(|&(i, _)| i >= first)
                    .map(|(_, span)| span)
                    .collect();
                (r.text, spans, r.plain, r.untrained_turns)
            }
        };
        // A row far longer than --max-seq-length is cut before it is tokenized, so that a huge
        // line costs what its kept tokens cost. The first max_seq_length tokens lie within
        // max_seq_length × (the longest token's bytes), and a margin keeps the tokenization
        // of the cut's neighbourhood from reaching back into them.
        let limit = (self.max_seq_length + 64).saturating_mul(self.tokenizer.max_token_bytes());
        let cut = text.len() > limit;
        let text = if cut {
            let mut end = limit;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            &text[..end]
        } else {
            &text[..]
        };
        let plain: Vec<_> = plain
            .into_iter()
            .filter(|r| r.start < text.len())
            .map(|r| r.start..r.end.min(text.len()))
            .collect();
        let (mut ids, offsets) = self
            .tokenizer
            .encode_mixed(text, &plain)
            .map_err(|e| err(e.to_string()))?;
        let mut trained: Vec<bool> = if self.mask_prompt {
            offsets
                .iter()
                .map(|&(s, e)| spans.iter().any(|&(a, b)| s < b && e > a))
                .collect()
        } else {
            vec![true; ids.len()]
        };
        // Plain text and template-less completions get the BOS token when the model wants one.
        let templated = matches!(rec.example, Example::Chat { .. })
            || (matches!(rec.example, Example::Completion { .. }) && self.template.is_some());
        if !templated && self.tokenizer.add_bos {
            if let Some(b) = self.tokenizer.bos_id() {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                    trained.insert(0, false);
                }
            }
        }
        let truncated = match ids.len().saturating_sub(self.max_seq_length) {
            0 if cut => 1,
            n => n,
        };
        ids.truncate(self.max_seq_length);
        trained.truncate(self.max_seq_length);
        Ok(Sample {
            ids,
            trained,
            truncated,
            untrained_turns,
        })
    }

    /// Renders a conversation: its text, where its assistant turns are and which message text
    /// is encoded as plain text.
    fn render_chat(&self, messages: &[Value], tools: Option<&[Value]>) -> Result<Rendered, String> {
        let tpl = self.template.as_ref().ok_or_else(|| {
            "this is a chat example but the model has no chat template; use a model with a template or {\"text\"} data".to_string()
        })?;
        let render_with = |msgs: &[Value], tools: Option<&[Value]>, gen: bool| {
            tpl.render(&ChatContext {
                messages: msgs,
                tools,
                add_generation_prompt: gen,
                bos_token: self.tokenizer.bos_token.as_deref(),
                eos_token: self.tokenizer.eos_token.as_deref(),
                extra: Map::new(),
            })
            .map_err(|e| {
                let hint = match messages.iter().position(|m| m.get("content") == Some(&Value::Null)) {
                    Some(i) => format!(
                        " (message {i} has `content: null`, which this template does not take; give it a string, even an empty one)"
                    ),
                    None => String::new(),
                };
                format!("the model's chat template cannot render this conversation: {e}{hint}")
            })
        };
        let render = |msgs: &[Value], gen: bool| render_with(msgs, tools, gen);
        let full = render(messages, false)?;
        self.check_tools_rendered(messages, tools, &full, |m, t| render_with(m, t, false))?;
        let mut spans = vec![];
        let mut untrained_turns = 0;
        let last_assistant = messages.iter().rposition(is_assistant);
        for (i, _) in messages.iter().enumerate().filter(|(_, m)| is_assistant(m)) {
            let before = render(&messages[..i], true)?;
            let upto = render(&messages[..=i], false)?;
            let start = if upto.starts_with(&before) {
                Some(before.len())
            } else {
                // A generation prompt that opens the answer with text a finished turn lacks
                // (DeepSeek-R1's `<think>\n`): the answer starts where a marker put in its
                // place is, if the turn renders the same up to there.
                let mut marked = messages[..=i].to_vec();
                marked[i]["content"] = Value::String(ANSWER_MARKER.into());
                let m = render(&marked, false)?;
                let asked = render(&messages[..i], false)?;
                m.find(ANSWER_MARKER)
                    .filter(|&at| at >= asked.len() && upto.get(..at) == m.get(..at))
            };
            if let Some(start) = start.filter(|&s| full.starts_with(&upto) && upto.len() > s) {
                let end = start + upto[start..].trim_end().len();
                spans.push((i, (start, end)));
            } else if Some(i) == last_assistant {
                return Err(format!(
                    "the chat template does not render message {i} (assistant) as an extension of the conversation before it, so its tokens cannot be located"
                ));
            } else {
                untrained_turns += 1;
            }
        }
        let plain = plain_ranges(self.tokenizer, messages, &full, |m| render(m, false))?;
        Ok(Rendered {
            text: full,
            spans,
            plain,
            untrained_turns,
        })
    }

    /// Refuses `tools`, or a message's `tool_calls`, that the template leaves out of `full`:
    /// the model would be trained on the conversation without them (a tool-calling turn as an
    /// empty answer).
    fn check_tools_rendered(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        full: &str,
        render: impl Fn(&[Value], Option<&[Value]>) -> Result<String, String>,
    ) -> Result<(), String> {
        // A render that fails without them takes them (a turn of only tool calls, say).
        let leaves_out = |m: &[Value], t: Option<&[Value]>| render(m, t).is_ok_and(|r| r == full);
        if tools.is_some_and(|t| !t.is_empty()) && leaves_out(messages, None) {
            return Err(
                "`tools` is left out by this model's chat template, so training would \
                        not see it; remove `tools`, or use a model whose template renders tools"
                    .into(),
            );
        }
        let calls = |m: &Value| {
            m.get("tool_calls")
                .is_some_and(|c| !c.is_null() && c.as_array().is_none_or(|a| !a.is_empty()))
        };
        for (i, _) in messages.iter().enumerate().filter(|(_, m)| calls(m)) {
            let mut without = messages.to_vec();
            if let Some(m) = without[i].as_object_mut() {
                m.remove("tool_calls");
            }
            if leaves_out(&without, tools) {
                return Err(format!(
                    "message {i}'s `tool_calls` are left out by this model's chat template, so \
                     training would not see them; remove the example, or use a model whose \
                     template renders tool calls"
                ));
            }
        }
        Ok(())
    }
}

/// A conversation as the template renders it.
struct Rendered {
    text: String,
    /// Byte spans of the assistant turns, with their messages' indices.
    spans: Vec<(usize, (usize, usize))>,
    /// Message text holding a control token's text, encoded as text.
    plain: Vec<std::ops::Range<usize>>,
    untrained_turns: usize,
}

/// Stands in for an answer's text, to find where a template puts it (private-use characters,
/// which no real answer holds).
const ANSWER_MARKER: &str = "\u{E002}answer\u{E003}";

fn is_assistant(m: &Value) -> bool {
    m.get("role").and_then(Value::as_str) == Some("assistant")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected_and_checked() {
        assert!(matches!(
            parse_line(r#"{"text": "hi"}"#).unwrap().0,
            Example::Text(_)
        ));
        assert!(matches!(
            parse_line(r#"{"prompt": "a", "completion": "b"}"#)
                .unwrap()
                .0,
            Example::Completion { .. }
        ));
        let chat = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
        assert!(matches!(parse_line(chat).unwrap().0, Example::Chat { .. }));
        for (line, needle) in [
            ("{\"text\": 3}", "must be a string"),
            ("[1]", "JSON object"),
            ("{\"foo\": 1}", "unknown format"),
            ("{\"prompt\": \"a\"}", "`completion` is missing"),
            ("{not json", "not valid JSON"),
            (
                r#"{"messages": [{"role": "user", "content": "a"}]}"#,
                "no assistant turn",
            ),
            (
                r#"{"messages": [{"role": "wizard", "content": "a"}]}"#,
                "unknown role",
            ),
            (r#"{"messages": []}"#, "empty"),
        ] {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(needle), "{line}: {e}");
        }
    }
}
