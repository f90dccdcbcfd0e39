//! A conversation to prompt tokens through the model's own chat template: one place for
//! `generate`, `validate` and `serve`.

use crate::data::chat_template::{ChatContext, ChatTemplate, TemplateError};
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
use serde_json::Value;

/// `messages` (OpenAI-style `{"role", "content"}` objects) rendered with the tokenizer's chat
/// template, ready for the assistant's reply, and encoded. Message text is text: a control
/// token's text in it (`<|im_end|>` in a pasted document) is encoded as the characters it is,
/// so no message can end its turn or forge another's; only the template's own markers are
/// control tokens.
pub fn chat_ids(tok: &Tokenizer, messages: &[Value]) -> Result<Vec<u32>> {
    let src = tok.chat_template.as_deref().ok_or(TemplateError::Missing)?;
    let template = ChatTemplate::new(src)?;
    let render = |messages: &[Value]| {
        template.render(&ChatContext {
            messages,
            add_generation_prompt: true,
            bos_token: tok.bos_token.as_deref(),
            eos_token: tok.eos_token.as_deref(),
            ..Default::default()
        })
    };
    let holds_special = |m: &Value| {
        content(m).is_some_and(|c| tok.special_texts().iter().any(|s| c.contains(s.as_str())))
    };
    if !messages.iter().any(holds_special) {
        // The common case, as the template renders it and as training encodes it.
        return Ok(tok.encode(&render(messages)?)?);
    }
    // The messages' text replaced by markers, to find it in what the template renders: the
    // template's text around it is encoded with its control tokens, the messages' as text.
    let marker = |i: usize| format!("\u{E000}{i}\u{E001}");
    let marked: Vec<Value> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut m = m.clone();
            if content(&m).is_some() {
                m["content"] = Value::String(marker(i));
            }
            m
        })
        .collect();
    let rendered = render(&marked)?;
    let mut rest = rendered.as_str();
    let mut ids = vec![];
    for (i, m) in messages.iter().enumerate() {
        let Some(text) = content(m) else { continue };
        let marker = marker(i);
        let at = match rest.match_indices(&marker).collect::<Vec<_>>()[..] {
            [(at, _)] => at,
            _ => {
                return Err(crate::error::Error::Usage(format!(
                    "message {} holds a control token's text, and this model's chat template \
                     does not place message text as given, so it cannot be kept apart from the \
                     template's markers; remove the control token from the message",
                    i + 1
                )))
            }
        };
        ids.extend(tok.encode(&rest[..at])?);
        ids.extend(tok.encode_plain(text)?);
        rest = &rest[at + marker.len()..];
    }
    ids.extend(tok.encode(rest)?);
    Ok(ids)
}

/// A single user turn, after an optional system prompt.
pub fn user_turn(system: Option<&str>, prompt: &str) -> Vec<Value> {
    let mut messages = vec![];
    if let Some(s) = system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    messages.push(serde_json::json!({"role": "user", "content": prompt}));
    messages
}

/// A message's text, where it is a string.
fn content(m: &Value) -> Option<&str> {
    m.get("content").and_then(Value::as_str)
}
