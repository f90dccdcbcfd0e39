//! A conversation to prompt tokens through the model's own chat template: one place for
//! `generate`, `validate` and `serve`.

use crate::data::chat_template::{ChatContext, ChatTemplate, TemplateError};
use crate::data::message_text;
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
pub use crate::infer::shape::call::CallForm;
use crate::infer::shape::unwritable;
use serde_json::Value;

/// `messages` (OpenAI-style `{"role", "content"}` objects) rendered with the tokenizer's chat
/// template, ready for the assistant's reply, and encoded. Message text is text: a control
/// token's text in it (`<|im_end|>` in a pasted document) is encoded as the characters it is,
/// so no message can end its turn or forge another's; only the template's own markers are
/// control tokens.
pub fn chat_ids(tok: &Tokenizer, messages: &[Value]) -> Result<Vec<u32>> {
    Ok(chat_ids_with_tools(tok, messages, None, None)?.ids)
}

/// [`chat_ids`], with the functions the model may call (OpenAI's `tools`, as transformers
/// passes them to the template). A template with no place for them (it renders the same
/// without them) is refused, [`TemplateError::NoPlaceForTools`]: the model would answer never
/// having seen them. So is one that leaves out earlier calls or their results.
///
/// With `call` (the functions the reply must call one of), the prompt goes on with the start
/// of a reply that calls it (see `call_opening`), which comes back beside the ids: the model
/// writes the rest.
pub fn chat_ids_with_tools(
    tok: &Tokenizer,
    messages: &[Value],
    tools: Option<&[Value]>,
    call: Option<&[&str]>,
) -> Result<ChatPrompt> {
    let template = template(tok)?;
    let with_tools = |messages: &[Value]| render(tok, &template, messages, tools);
    let full = match with_tools(messages) {
        // A failure the tools make is theirs to fix, not the messages'.
        Err(e) if tools.is_some() && render(tok, &template, messages, None).is_ok() => {
            return Err(TemplateError::FailsOnTools(e.to_string()).into())
        }
        full => full?,
    };
    if tools.is_some() && full == render(tok, &template, messages, None)? {
        return Err(TemplateError::NoPlaceForTools.into());
    }
    if let Some(i) = messages.iter().position(|m| {
        let text = m["content"].as_str().map(str::trim).unwrap_or_default();
        m["role"] == "user" && !text.is_empty() && !full.contains(text)
    }) {
        return Err(TemplateError::DropsMessage(i).into());
    }
    hides_tool_history(messages, &full, with_tools)?;
    let plain = message_text::plain_ranges(tok, messages, &full, with_tools)
        .map_err(crate::error::Error::Usage)?;
    let mut ids = tok.encode_mixed(&full, &plain)?.0;
    let Some(tools) = tools else {
        return Ok(ChatPrompt {
            ids,
            opening: None,
            form: None,
        });
    };
    let form = call_form(tok, &template, messages, tools, &full);
    let (form, opening) = match call {
        Some(names) => {
            let form = form?;
            let (opening, more) = call_opening(tok, &form, names)?;
            ids.extend(more);
            (Some(form), Some(opening))
        }
        None => (form.ok(), None),
    };
    Ok(ChatPrompt { ids, opening, form })
}

/// A conversation's prompt, with tools.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPrompt {
    pub ids: Vec<u32>,
    /// Where the reply must call: the start of its call, which the prompt ends with.
    pub opening: Option<Opening>,
    /// With tools, how the template writes a call (None where its render shows none).
    pub form: Option<CallForm>,
}

/// Refuses a conversation whose earlier calls, or their results, the template leaves out: it
/// renders the same without them (SmolLM2's own shows a call-only turn as an empty one). A
/// render that fails without them shows that the template reads them.
fn hides_tool_history(
    messages: &[Value],
    full: &str,
    render: impl Fn(&[Value]) -> std::result::Result<String, TemplateError>,
) -> std::result::Result<(), TemplateError> {
    let same_without = |keep: &dyn Fn(&Value) -> Option<Value>| {
        let fewer: Vec<Value> = messages.iter().filter_map(keep).collect();
        fewer != messages && render(&fewer).is_ok_and(|r| r == full)
    };
    let no_calls = |m: &Value| {
        let mut m = m.clone();
        m.as_object_mut().map(|o| o.remove("tool_calls"));
        Some(m)
    };
    if same_without(&no_calls) {
        return Err(TemplateError::HidesToolHistory(
            "earlier calls (`tool_calls`)",
        ));
    }
    let no_results = |m: &Value| (m["role"] != "tool").then(|| m.clone());
    if same_without(&no_results) {
        return Err(TemplateError::HidesToolHistory(
            "tool results (`tool` messages)",
        ));
    }
    Ok(())
}

/// The marks a call is rendered with to find its form.
const NAME: &str = "__your_ai_name__";
const ARGS: &str = "__your_ai_arguments__";
const ID: &str = "__your_ai_id__";
const TEXT: &str = "__your_ai_text__";

/// The start of a forced call that the prompt ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct Opening {
    /// Its text: the reply is it and what the model writes after it.
    pub text: String,
    /// Where the model chooses among several functions: for each, the tokens from the end of
    /// the prompt to where its arguments begin (its name and what follows it), as the model
    /// would write them. The reply goes on with one of them.
    pub choices: Vec<Vec<u32>>,
}

/// How this template writes a call after `messages` (`prompt`, rendered with `tools` for the
/// reply): found by rendering an assistant turn that calls a marked name with marked
/// arguments, from the end of the generation prompt to the turn's end (the prompt itself need
/// not be a prefix of that render: Hermes's ends a last tool message otherwise).
fn call_form(
    tok: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Value],
    tools: &[Value],
    prompt: &str,
) -> Result<CallForm> {
    let render_as = |messages: &[Value], add_generation_prompt: bool| {
        template.render(&ChatContext {
            messages,
            tools: Some(tools),
            add_generation_prompt,
            bos_token: tok.bos_token.as_deref(),
            eos_token: tok.eos_token.as_deref(),
            ..Default::default()
        })
    };
    let base = render_as(messages, false)?;
    let generation = prompt
        .strip_prefix(base.as_str())
        .unwrap_or_default()
        .to_string();
    let mut called = messages.to_vec();
    called.push(
        serde_json::json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": ID, "type": "function", "function": {"name": NAME, "arguments": {ARGS: 1}}}
        ]}),
    );
    let turn = render_as(&called, false)?;
    // Where the call's turn can begin: past what it shares with the conversation's render.
    let mut shared = turn
        .bytes()
        .zip(base.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    while !turn.is_char_boundary(shared) {
        shared -= 1;
    }
    // The last marks: the call's, not a message's that happens to hold them.
    let form = turn.rfind(ARGS).and_then(|args| {
        let start = match generation.as_str() {
            "" => turn.starts_with(prompt).then_some(prompt.len())?,
            g => shared + turn.get(shared..args)?.rfind(g)? + g.len(),
        };
        let call = turn.get(start..args)?;
        let call = &call[..call.rfind('{')?];
        let (start, mid) = call.split_once(NAME)?;
        // The marked arguments, `{ARGS: 1}`, end at the first brace after the mark.
        let end = args + turn[args..].find('}')? + 1;
        Some((start.to_string(), mid.to_string(), &turn[end..]))
    });
    let Some((start, mid, after)) = form else {
        return Err(TemplateError::NoCallForm.into());
    };
    let shown = tok
        .decode(&tok.encode(&start)?, true)?
        .trim_start()
        .to_string();
    // How the template ends an assistant turn (`<|eot_id|>`), found from one of text: not
    // the call's.
    let mut answered = messages.to_vec();
    answered.push(serde_json::json!({"role": "assistant", "content": TEXT}));
    let answered = render_as(&answered, false)?;
    let turn_end = answered
        .rfind(TEXT)
        .map_or("", |i| &answered[i + TEXT.len()..]);
    let after = after.strip_suffix(turn_end).unwrap_or(after);
    let close = call_close(tok, after)?;
    Ok(CallForm {
        start,
        shown,
        mid,
        close,
    })
}

/// The close of a call, from `after`, a rendered call's text after its arguments and before
/// its turn's end: up to any control token or end-of-sequence text in it, blanks trimmed.
/// Empty where it holds the call's id (Mistral's), which no reply can be held to.
fn call_close(tok: &Tokenizer, after: &str) -> Result<String> {
    let (ids, spans) = tok.encode_offsets(after)?;
    let texts = tok.token_texts();
    let control = |id: u32| texts.get(id as usize).is_none_or(Option::is_none);
    let mut end = ids
        .iter()
        .zip(&spans)
        .find(|(&id, _)| control(id) || tok.is_end(id))
        .map_or(after.len(), |(_, span)| span.0);
    if let Some(eos) = tok.eos_token.as_deref().filter(|e| !e.is_empty()) {
        end = end.min(after.find(eos).unwrap_or(end));
    }
    let close = after.get(..end).unwrap_or_default().trim_end();
    // Nor one with a character this model writes only in pieces (the guide could not).
    let unheld = close.contains(ID) || unwritable(&[close], tok).is_some();
    Ok(match unheld {
        true => String::new(),
        false => close.to_string(),
    })
}

/// The start of a reply that calls one of `names`, as `form` writes it: up to where the
/// arguments begin (Qwen's `<tool_call>\n{"name": "f", "arguments": `), and its ids, each name
/// as plain text. Of several names, the ids they all start with are the prompt's, and the
/// rest the [`Opening::choices`].
fn call_opening(tok: &Tokenizer, form: &CallForm, names: &[&str]) -> Result<(Opening, Vec<u32>)> {
    let named = |n: &str| -> Result<(String, Vec<u32>)> {
        let text = format!("{}{n}{}", form.start, form.mid);
        let at = form.start.len();
        let ids = tok
            .encode_mixed(&text, std::slice::from_ref(&(at..at + n.len())))?
            .0;
        Ok((text, ids))
    };
    let Some(first) = names.first() else {
        return Err(TemplateError::NoCallForm.into());
    };
    let (text, ids) = named(first)?;
    if names.len() == 1 {
        let choices = vec![];
        return Ok((Opening { text, choices }, ids));
    }
    let all = names.iter().map(|n| named(n)).collect::<Result<Vec<_>>>()?;
    let shared = all.iter().fold(ids.len(), |n, (_, other)| {
        n.min(ids.iter().zip(other).take_while(|(a, b)| a == b).count())
    });
    // The text before the parting: each call's text without its own ids' text, as the
    // generation decodes it. Where the texts do not line up so, the reply opens up to where
    // a name goes.
    let mut head = None;
    for (text, ids) in &all {
        let tail = tok.decode(&ids[shared..], true)?;
        let this = text
            .strip_suffix(tail.as_str())
            .filter(|_| ids.len() > shared);
        if this.is_none() || head.is_some_and(|h| Some(h) != this) {
            head = None;
            break;
        }
        head = this;
    }
    Ok(match head {
        Some(head) => (
            Opening {
                text: head.to_string(),
                choices: all.iter().map(|(_, ids)| ids[shared..].to_vec()).collect(),
            },
            ids[..shared].to_vec(),
        ),
        None => {
            let text = form.start.clone();
            let ids = tok.encode(&text)?;
            let choices = vec![];
            (Opening { text, choices }, ids)
        }
    })
}

fn template(tok: &Tokenizer) -> std::result::Result<ChatTemplate, TemplateError> {
    ChatTemplate::new(tok.chat_template.as_deref().ok_or(TemplateError::Missing)?)
}

fn render(
    tok: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Value],
    tools: Option<&[Value]>,
) -> std::result::Result<String, TemplateError> {
    template.render(&ChatContext {
        messages,
        tools,
        add_generation_prompt: true,
        bos_token: tok.bos_token.as_deref(),
        eos_token: tok.eos_token.as_deref(),
        ..Default::default()
    })
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
