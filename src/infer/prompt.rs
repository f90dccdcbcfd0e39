//! A conversation to prompt tokens through the model's own chat template: one place for
//! `generate`, `validate` and `serve`.

use crate::data::chat_template::{ChatContext, ChatTemplate, TemplateError};
use crate::data::message_text;
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
    let full = render(messages)?;
    let plain = message_text::plain_ranges(tok, messages, &full, render)
        .map_err(crate::error::Error::Usage)?;
    Ok(tok.encode_mixed(&full, &plain)?.0)
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
