//! Function calling in OpenAI's form: the request's `tools` go to the model's chat template,
//! earlier calls and their results in `messages` are rendered as the template renders them, and
//! a reply that is a call (in one of the forms chat models write them) comes back as
//! `tool_calls`, with `finish_reason` "tool_calls".
//!
//! Forms read: Hermes and Qwen's `<tool_call>{...}</tool_call>` (one or more), Mistral's
//! `[TOOL_CALLS] [{...}]`, and a bare JSON object or array of them (Llama 3.1's form), each
//! `{"name", "arguments" | "parameters"}`. A call is only one to a function the request
//! named; anything else is the reply's text.

use super::api::ApiError;
use serde_json::{json, Map, Value};

/// The request's functions, and whether a reply may be read as a call to them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// As given, for the template (`{"type": "function", "function": {...}}`).
    pub defs: Vec<Value>,
    pub names: Vec<String>,
    /// False under `tool_choice` "none": the model sees the tools and answers in text.
    pub calls: bool,
}

/// A call the reply made: the function's name and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

/// The request's `tools` (and `tool_choice`: auto or none; a forced call is refused before).
pub fn from_request(m: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let defs = match m.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("tools"),
                "`tools` must be an array of {\"type\": \"function\", \"function\": {...}}",
            ))
        }
    };
    let mut names = vec![];
    for (i, t) in defs.iter().enumerate() {
        let bad = |what: &str| ApiError::invalid(Some("tools"), format!("tools[{i}]: {what}"));
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("`type` must be \"function\""));
        }
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("`function.name` is missing"))?;
        if names.iter().any(|n| n == name) {
            return Err(bad(&format!("`{name}` is given twice")));
        }
        names.push(name.to_string());
    }
    let calls = m.get("tool_choice").and_then(Value::as_str) != Some("none");
    Ok(Some(Tools {
        defs: defs.clone(),
        names,
        calls,
    }))
}

/// An assistant message's `tool_calls`, as chat templates take them (transformers' form: the
/// arguments as an object, not OpenAI's JSON text), or None where it has none.
pub fn history_calls(i: usize, msg: &Value) -> Result<Option<Value>, ApiError> {
    let bad = |what: String| ApiError::invalid(Some("messages"), format!("messages[{i}]: {what}"));
    let calls = match msg.get("tool_calls") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("`tool_calls` must be an array".into())),
    };
    let mut out = vec![];
    for (j, c) in calls.iter().enumerate() {
        let f = c
            .get("function")
            .ok_or_else(|| bad(format!("tool_calls[{j}].function is missing")))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tool_calls[{j}].function.name is missing")))?;
        let arguments = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str::<Value>(s).map_err(|e| {
                bad(format!(
                    "tool_calls[{j}].function.arguments is not JSON ({e})"
                ))
            })?,
            Some(v @ Value::Object(_)) => v.clone(),
            None | Some(Value::Null) => json!({}),
            Some(_) => {
                return Err(bad(format!(
                    "tool_calls[{j}].function.arguments must be JSON text"
                )))
            }
        };
        let mut call =
            json!({"type": "function", "function": {"name": name, "arguments": arguments}});
        if let Some(id) = c.get("id").filter(|v| v.is_string()) {
            call["id"] = id.clone();
        }
        out.push(call);
    }
    Ok(Some(Value::Array(out)))
}

/// Whether text that starts so could still turn out to be a call (a stream holds it back
/// until it knows): a JSON object's first key, an array's first object, or the start of a
/// tagged form. "[1] Paris…" or "{x}" is text from its second character on.
pub fn could_be_call(text: &str) -> bool {
    let t = text.trim_start();
    let opens = ["<tool_call>", "[TOOL_CALLS]"];
    if t.is_empty() || opens.iter().any(|o| o.starts_with(t) || t.starts_with(o)) {
        return true;
    }
    // What follows the opening bracket, once it is there: a key's quote, an object's brace.
    let then = |open: char, next: char| {
        t.strip_prefix(open)
            .map(|rest| rest.trim_start().chars().next().is_none_or(|c| c == next))
    };
    then('{', '"').or_else(|| then('[', '{')).unwrap_or(false)
}

/// The calls `text` makes to the functions `names`, if it is nothing but calls.
pub fn parse(text: &str, names: &[String]) -> Option<Vec<Call>> {
    let t = text.trim();
    let values: Vec<Value> = if t.starts_with("<tool_call>") {
        let mut out = vec![];
        let mut rest = t;
        while let Some(after) = rest.strip_prefix("<tool_call>") {
            let (body, tail) = after.split_once("</tool_call>").unwrap_or((after, ""));
            out.push(serde_json::from_str(body.trim()).ok()?);
            rest = tail.trim_start();
        }
        if !rest.is_empty() {
            return None;
        }
        out
    } else {
        let t = t.strip_prefix("[TOOL_CALLS]").unwrap_or(t).trim_start();
        match serde_json::from_str(t).ok()? {
            Value::Array(a) => a,
            v => vec![v],
        }
    };
    if values.is_empty() {
        return None;
    }
    values.iter().map(|v| call(v, names)).collect()
}

/// One `{"name", "arguments" | "parameters"}` to a named function.
fn call(v: &Value, names: &[String]) -> Option<Call> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?;
    if !names.iter().any(|n| n == name) {
        return None;
    }
    let arguments = match o.get("arguments").or_else(|| o.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as JSON text already.
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
        Some(args @ Value::Object(_)) => args.to_string(),
        Some(_) => return None,
    };
    Some(Call {
        name: name.to_string(),
        arguments,
    })
}

/// The calls as OpenAI's `tool_calls`, each with a fresh id the client answers with (random:
/// a conversation can outlive the server); `index` for a stream's delta.
pub fn to_json(calls: &[Call], streamed: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = json!({
                    "id": format!("call_{:016x}", rand::random::<u64>()),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                });
                if streamed {
                    v["index"] = json!(i);
                }
                v
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "add".into()]
    }

    #[test]
    fn calls_in_each_form_are_read_and_anything_else_is_text() {
        let weather = Call {
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        };
        for text in [
            r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#,
            r#" {"name":"get_weather","arguments":{"city":"Paris"}} "#,
            r#"{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}"#,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]"#,
        ] {
            assert_eq!(parse(text, &names()), Some(vec![weather.clone()]), "{text}");
        }
        let two = "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1}}</tool_call>\n\
                   <tool_call>{\"name\":\"get_weather\"}</tool_call>";
        let calls = parse(two, &names()).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[1].name.as_str(), calls[1].arguments.as_str()),
            ("get_weather", "{}")
        );
        for text in [
            "The weather in Paris is sunny.",
            r#"{"name": "delete_everything", "arguments": {}}"#,
            r#"{"city": "Paris"}"#,
            r#"{"name": "add", "arguments": {"a": 1}} and then"#,
            "<tool_call>{\"name\":\"add\"}</tool_call> done",
            "[]",
        ] {
            assert_eq!(parse(text, &names()), None, "{text}");
        }
    }

    #[test]
    fn a_stream_holds_back_only_what_could_still_be_a_call() {
        for held in [
            "",
            "  ",
            "{",
            "{ \"na",
            "[",
            "[ {\"name",
            "[TOOL",
            "<tool",
            "<tool_call>{",
        ] {
            assert!(could_be_call(held), "{held:?}");
        }
        for text in [
            "The",
            " Sure",
            "<b>",
            "Hello {",
            "<tool_cal!",
            "[1] Paris",
            "{x}",
            "[ \"a\"]",
        ] {
            assert!(!could_be_call(text), "{text:?}");
        }
    }

    #[test]
    fn tools_and_history_calls_are_checked_naming_the_field() {
        let m = |v: Value| v.as_object().unwrap().clone();
        let t = from_request(&m(json!({"tools": [
            {"type": "function", "function": {"name": "add", "parameters": {}}}
        ], "tool_choice": "none"})))
        .unwrap()
        .unwrap();
        assert_eq!((t.names.clone(), t.calls), (vec!["add".to_string()], false));
        for (tools, why) in [
            (json!({"tools": {}}), "must be an array"),
            (json!({"tools": [{"type": "code"}]}), "tools[0]: `type`"),
            (
                json!({"tools": [{"type": "function", "function": {}}]}),
                "function.name",
            ),
        ] {
            let e = from_request(&m(tools)).unwrap_err();
            assert!(e.message.contains(why), "{}", e.message);
        }
        let msg = json!({"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\": 1}"}}]});
        let calls = history_calls(2, &msg).unwrap().unwrap();
        assert_eq!(calls[0]["function"]["arguments"], json!({"a": 1}));
        assert_eq!(calls[0]["id"], "call_1");
        let bad = json!({"role": "assistant", "tool_calls": [{"function": {"name": "add",
            "arguments": "{oops"}}]});
        let e = history_calls(2, &bad).unwrap_err();
        assert!(e
            .message
            .contains("messages[2]: tool_calls[0].function.arguments is not JSON"));
    }
}
