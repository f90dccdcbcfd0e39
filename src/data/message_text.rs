//! Message text is text. A control token's text inside a message (`<|im_end|>` in a pasted
//! document or a scraped page) is encoded as the characters it is, never as the control token:
//! otherwise a message could end its turn or forge another's at inference, and training would
//! teach the model to end its turn mid-answer. Only the chat template's own markers are
//! control tokens. Training and inference find such text the same way, so they agree.

use super::tokenizer::Tokenizer;
use serde_json::Value;
use std::ops::Range;

/// The byte ranges of `full` (the conversation as `render` renders it) holding the text of the
/// messages that contain a control token's text; none in the common case, which costs one
/// scan of the messages.
pub fn plain_ranges<E: std::fmt::Display>(
    tok: &Tokenizer,
    messages: &[Value],
    full: &str,
    render: impl Fn(&[Value]) -> Result<String, E>,
) -> Result<Vec<Range<usize>>, String> {
    let holds_special = |m: &Value| {
        content(m).is_some_and(|c| tok.special_texts().iter().any(|s| c.contains(s.as_str())))
    };
    let held: Vec<usize> = (0..messages.len())
        .filter(|&i| holds_special(&messages[i]))
        .collect();
    if held.is_empty() {
        return Ok(vec![]);
    }
    // Those messages' text replaced by markers, found in what the template renders; the text
    // around each marker is the template's, and must be as it is in `full`.
    let marker = |i: usize| format!("\u{E000}{i}\u{E001}");
    let mut marked = messages.to_vec();
    for &i in &held {
        marked[i]["content"] = Value::String(marker(i));
    }
    let rendered = render(&marked).map_err(|e| e.to_string())?;
    let not_as_given = |i: usize| {
        format!(
            "message {i} holds a control token's text, and this model's chat template does not \
             place message text as given, so it cannot be kept apart from the template's \
             markers; remove the control token's text from the message"
        )
    };
    // The template's text around the markers, in order: pieces[k] comes before message
    // held[k]'s text, and the last piece after the last one.
    let mut pieces = vec![];
    let mut rest = rendered.as_str();
    for &i in &held {
        let marker = marker(i);
        let [(at, _)] = rest.match_indices(&marker).collect::<Vec<_>>()[..] else {
            return Err(not_as_given(i));
        };
        pieces.push(&rest[..at]);
        rest = &rest[at + marker.len()..];
    }
    pieces.push(rest);
    let mut at_full = 0;
    let mut ranges = vec![];
    for (k, &i) in held.iter().enumerate() {
        let start = at_full + pieces[k].len();
        if full.get(at_full..start) != Some(pieces[k]) {
            return Err(not_as_given(i));
        }
        // As given, or trimmed as templates often do (Llama 3's `| trim`), and followed by
        // the template's next text.
        let text = content(&messages[i]).unwrap_or_default();
        let placed = [text, text.trim(), text.trim_start(), text.trim_end()]
            .into_iter()
            .find(|t| {
                full.get(start..start + t.len()) == Some(t)
                    && full[start + t.len()..].starts_with(pieces[k + 1])
            })
            .ok_or_else(|| not_as_given(i))?;
        ranges.push(start..start + placed.len());
        at_full = start + placed.len();
    }
    if full.get(at_full..) != pieces.last().copied() {
        return Err(not_as_given(messages.len()));
    }
    Ok(ranges)
}

/// A message's text, where it is a string.
fn content(m: &Value) -> Option<&str> {
    m.get("content").and_then(Value::as_str)
}

/// The text of a `content` given as a list of parts (OpenAI's form,
/// `[{"type": "text", "text": "…"}]`), joined as one string: the chat templates of text models
/// take a string. A part that is not text (an image, audio) is refused, naming its type.
pub fn text_of_parts(parts: &[Value]) -> Result<String, String> {
    let mut text = String::new();
    for (j, p) in parts.iter().enumerate() {
        match (p.get("type").and_then(Value::as_str), p.get("text")) {
            (Some("text"), Some(Value::String(t))) => text.push_str(t),
            (Some("text"), _) => return Err(format!("content part {j} has no string `text`")),
            (Some(other), _) => {
                return Err(format!(
                    "content part {j} is of type `{other}`: only text parts are supported \
                     (the model takes text only)"
                ))
            }
            (None, _) => return Err(format!("content part {j} has no string `type`")),
        }
    }
    Ok(text)
}
