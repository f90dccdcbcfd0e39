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
    pub choice: Choice,
    /// `parallel_tool_calls` (default true); false keeps a reply's first call only.
    pub parallel: bool,
}

impl Tools {
    /// Whether a reply may be read as calls (not under `tool_choice` "none").
    pub fn calls(&self) -> bool {
        self.choice != Choice::None
    }

    /// Whether the reply is started as a call, and to which function (None: the model names
    /// it, of several; with one there is nothing to choose).
    pub fn forced(&self) -> Option<Option<&str>> {
        match &self.choice {
            Choice::Required if self.names.len() == 1 => Some(Some(&self.names[0])),
            Choice::Required => Some(None),
            Choice::Named(n) => Some(Some(n)),
            Choice::Auto | Choice::None => None,
        }
    }

    /// The calls a reply makes, if it is nothing but calls (if it starts with them, where it
    /// was started as one): its first only where the request asked for no parallel calls.
    pub fn read(&self, text: &str, forced: bool) -> Option<Vec<Call>> {
        let mut calls = leading(text, &self.names, !forced)?;
        if !self.parallel {
            calls.truncate(1);
        }
        Some(calls)
    }
}

/// `tool_choice`: whether the reply may, must, or must not call.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The model decides.
    Auto,
    /// The model sees the tools and answers in text.
    None,
    /// The reply is started as a call, the model naming the function.
    Required,
    /// The reply is started as a call to this function.
    Named(String),
}

/// A call the reply made: the function's name and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

/// The fields that only mean something with `tools`.
const WITH_TOOLS: [&str; 2] = ["tool_choice", "parallel_tool_calls"];

/// The request's `tools`, `tool_choice` and `parallel_tool_calls`.
pub fn from_request(m: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let given = |name: &str| m.get(name).is_some_and(|v| !v.is_null());
    let defs = match m.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(Value::Array(a)) => Some(a),
        Some(_) => {
            return Err(ApiError::invalid(
                Some("tools"),
                "`tools` must be an array of {\"type\": \"function\", \"function\": {...}}",
            ))
        }
    };
    let Some(defs) = defs else {
        return match WITH_TOOLS.into_iter().find(|n| given(n)) {
            // As OpenAI's API answers.
            Some(name) => Err(ApiError::invalid(
                Some(name),
                format!("`{name}` is only allowed when `tools` are given"),
            )),
            None => Ok(None),
        };
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
        // OpenAI's rule; templates put the name in their text as it is, so a quote or a tag
        // in it would make calls that cannot be read back.
        let fine = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.len() > 64 || !name.chars().all(fine) {
            return Err(bad(&format!(
                "`function.name` {name:?} must be 1 to 64 letters, digits, _ or -"
            )));
        }
        if names.iter().any(|n| n == name) {
            return Err(bad(&format!("`{name}` is given twice")));
        }
        // Strict mode promises arguments that match the schema, which only constrained
        // decoding can keep.
        if t["function"].get("strict") == Some(&Value::Bool(true)) {
            return Err(bad(
                "`function.strict`: this server cannot hold the arguments to the schema \
                 (it has no constrained decoding); leave `strict` out or false",
            ));
        }
        names.push(name.to_string());
    }
    let named = |o: &Map<String, Value>| {
        let f = o.get("function")?.get("name")?.as_str()?;
        (o.get("type")? == "function").then(|| f.to_string())
    };
    let choice = match m.get("tool_choice") {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) if s == "auto" => Choice::Auto,
        Some(Value::String(s)) if s == "none" => Choice::None,
        Some(Value::String(s)) if s == "required" => Choice::Required,
        Some(Value::Object(o)) if named(o).is_some() => {
            let name = named(o).unwrap_or_default();
            if !names.contains(&name) {
                return Err(ApiError::invalid(
                    Some("tool_choice"),
                    format!("`tool_choice` names `{name}`, which is not one of `tools`"),
                ));
            }
            Choice::Named(name)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("tool_choice"),
                "`tool_choice` must be \"auto\", \"none\", \"required\" or \
                 {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ))
        }
    };
    let parallel = match m.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("parallel_tool_calls"),
                "`parallel_tool_calls` must be true or false",
            ))
        }
    };
    Ok(Some(Tools {
        defs: defs.clone(),
        names,
        choice,
        parallel,
    }))
}

/// `tools` and its fields on `/v1/completions`, which has no functions in OpenAI's API:
/// refused rather than ignored.
pub fn refuse_on_completions(m: &Map<String, Value>) -> Result<(), ApiError> {
    let name = ["tools"]
        .into_iter()
        .chain(WITH_TOOLS)
        .find(|n| m.get(*n).is_some_and(|v| !v.is_null()));
    match name {
        Some(name) => Err(ApiError::invalid(
            Some(name),
            format!("`{name}` is for /v1/chat/completions; /v1/completions has no tools"),
        )),
        None => Ok(()),
    }
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
        if c.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(format!("tool_calls[{j}].type must be \"function\"")));
        }
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
        let id = match c.get("id") {
            Some(Value::String(id)) if !id.is_empty() => id,
            None | Some(Value::Null) => return Err(bad(format!("tool_calls[{j}].id is missing"))),
            Some(_) => {
                return Err(bad(format!(
                    "tool_calls[{j}].id must be a non-empty string"
                )))
            }
        };
        out.push(json!({"id": id, "type": "function",
            "function": {"name": name, "arguments": arguments}}));
    }
    Ok(Some(Value::Array(out)))
}

/// That each tool message answers a call made before it in the conversation, as OpenAI's API
/// requires: a result with no call in front of it is a client's bookkeeping gone wrong.
pub fn check_answers(messages: &[Value]) -> Result<(), ApiError> {
    let bad = |i: usize, what: String| {
        ApiError::invalid(Some("messages"), format!("messages[{i}]: {what}"))
    };
    // The calls of the last assistant message that made some, not yet answered.
    let mut open: Vec<&str> = vec![];
    let mut asked_at = 0;
    for (i, m) in messages.iter().enumerate() {
        if m["role"] == "tool" {
            let id = m["tool_call_id"].as_str().unwrap_or_default();
            let Some(k) = open.iter().position(|o| *o == id) else {
                return Err(bad(
                    i,
                    format!(
                        "`tool_call_id` \"{id}\" answers no call still open before it (each \
                         `tool_calls[].id` of the assistant message before, answered once)"
                    ),
                ));
            };
            open.remove(k);
            continue;
        }
        if !open.is_empty() {
            return Err(bad(i, unanswered(asked_at, &open)));
        }
        open = m["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["id"].as_str())
            .collect();
        asked_at = i;
    }
    match open.is_empty() {
        true => Ok(()),
        false => Err(bad(messages.len() - 1, unanswered(asked_at, &open))),
    }
}

/// As OpenAI's API requires: an assistant message's calls are each answered by a tool message
/// right after it.
fn unanswered(asked_at: usize, open: &[&str]) -> String {
    format!(
        "the calls of messages[{asked_at}] must each be answered by a tool message right after \
         it; no result for {}",
        open.join(", ")
    )
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
    leading(text, names, true)
}

/// The calls `text` opens with; with `whole`, only where nothing follows them. A reply started
/// as a call is read so: what a model writes after the call it was made to make is dropped.
fn leading(text: &str, names: &[String], whole: bool) -> Option<Vec<Call>> {
    let t = text.trim();
    // The values read in turn, and whether the text went on past them.
    let (values, more): (Vec<Option<Value>>, bool) = if t.starts_with("<tool_call>") {
        let mut out = vec![];
        let mut rest = t;
        while let Some(after) = rest.strip_prefix("<tool_call>") {
            // Unclosed, it is not a whole call: a model cut short, or text about the tag.
            let Some((body, tail)) = after.split_once("</tool_call>") else {
                out.push(None);
                break;
            };
            out.push(serde_json::from_str(body.trim()).ok());
            rest = tail.trim_start();
        }
        (out, !rest.is_empty())
    } else {
        let t = t.strip_prefix("[TOOL_CALLS]").unwrap_or(t).trim_start();
        let mut values = serde_json::Deserializer::from_str(t).into_iter::<Value>();
        let first = values.next()?.ok()?;
        let more = !t[values.byte_offset()..].trim().is_empty();
        match first {
            Value::Array(a) => (a.into_iter().map(Some).collect(), more),
            v => (vec![Some(v)], more),
        }
    };
    let calls: Vec<Option<Call>> = values.iter().map(|v| call(v.as_ref()?, names)).collect();
    if whole {
        // Nothing but calls, each one whole.
        return match more || calls.is_empty() {
            true => None,
            false => calls.into_iter().collect(),
        };
    }
    // A reply started as a call: the calls it opens with, up to anything that is not one.
    let first: Vec<Call> = calls.into_iter().map_while(|c| c).collect();
    (!first.is_empty()).then_some(first)
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
        // Some models write the arguments as JSON text already; an object, as OpenAI's are.
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok_and(|v| v.is_object()) => {
            s.clone()
        }
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
            "<tool_call>{\"name\":\"add\"}",
            r#"{"name": "add", "arguments": "5"}"#,
            r#"{"name": "add", "arguments": "[1]"}"#,
            "[]",
        ] {
            assert_eq!(parse(text, &names()), None, "{text}");
        }
    }

    #[test]
    fn without_parallel_calls_a_reply_keeps_its_first() {
        let m = |v: Value| v.as_object().unwrap().clone();
        let tools = json!([{"type": "function", "function": {"name": "add"}}]);
        let two = "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1}}</tool_call>\
                   <tool_call>{\"name\":\"add\",\"arguments\":{\"a\":2}}</tool_call>";
        for (parallel, want) in [(json!(null), 2), (json!(true), 2), (json!(false), 1)] {
            let t = from_request(&m(json!({"tools": tools, "parallel_tool_calls": parallel})))
                .unwrap()
                .unwrap();
            let calls = t.read(two, false).unwrap();
            assert_eq!(calls.len(), want, "{parallel}");
            assert_eq!(calls[0].arguments, r#"{"a":1}"#);
            // Text after the calls: not a call, unless the reply was started as one.
            let more = format!("{two}\nThe answer is 3.");
            assert_eq!(t.read(&more, false), None);
            assert_eq!(t.read(&more, true), Some(calls));
        }
        let t = from_request(&m(json!({"tools": tools}))).unwrap().unwrap();
        // Started as a call: a later call cut short or to another function ends the calls.
        let one = "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1}}</tool_call>";
        for after in [
            "\n<tool_call>\n",
            "<tool_call>{\"name\":\"rm\"}</tool_call>",
        ] {
            let text = format!("{one}{after}");
            assert_eq!(t.read(&text, true).map(|c| c.len()), Some(1), "{text}");
            assert_eq!(t.read(&text, false), None, "{text}");
        }
        let bare = r#"{"name": "add", "parameters": {"a": 1}} Done."#;
        assert_eq!(
            (t.read(bare, false), t.read(bare, true).map(|c| c.len())),
            (None, Some(1))
        );
    }

    #[test]
    fn tool_fields_are_checked_and_what_cannot_be_kept_is_refused() {
        let m = |v: Value| v.as_object().unwrap().clone();
        let f = json!([{"type": "function", "function": {"name": "f"}}]);
        for choice in [json!("auto"), json!(null)] {
            let t = from_request(&m(json!({"tools": f, "tool_choice": choice})));
            assert_eq!(t.unwrap().unwrap().choice, Choice::Auto, "{choice}");
        }
        let named = json!({"type": "function", "function": {"name": "f"}});
        for (choice, want) in [
            (json!("required"), Choice::Required),
            (named, Choice::Named("f".into())),
        ] {
            let t = from_request(&m(json!({"tools": f, "tool_choice": choice}))).unwrap();
            assert_eq!(t.unwrap().choice, want);
        }
        // (request, param, words of the message)
        for (req, param, why) in [
            (
                json!({"tools": f, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
                "names `g`, which is not one of `tools`",
            ),
            (
                json!({"tools": f, "tool_choice": "bogus"}),
                "tool_choice",
                "must be \"auto\"",
            ),
            (
                json!({"tools": f, "tool_choice": {"type": "auto"}}),
                "tool_choice",
                "must be",
            ),
            (
                json!({"tools": f, "tool_choice": 1}),
                "tool_choice",
                "must be",
            ),
            (
                json!({"tool_choice": "auto"}),
                "tool_choice",
                "only allowed when `tools`",
            ),
            (
                json!({"tools": [], "tool_choice": "none"}),
                "tool_choice",
                "only allowed",
            ),
            (
                json!({"parallel_tool_calls": false}),
                "parallel_tool_calls",
                "only allowed",
            ),
            (
                json!({"tools": f, "parallel_tool_calls": "no"}),
                "parallel_tool_calls",
                "true or false",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "strict": true}}]}),
                "tools",
                "tools[0]: `function.strict`",
            ),
        ] {
            let e = from_request(&m(req.clone())).unwrap_err();
            assert_eq!(e.param, Some(param), "{req}");
            assert!(e.message.contains(why), "{req}: {}", e.message);
        }
        for name in [
            "get\"weather",
            "a b",
            "</tool_call>",
            "天气",
            &"x".repeat(65),
        ] {
            let req = json!({"tools": [{"type": "function", "function": {"name": name}}]});
            let e = from_request(&m(req)).unwrap_err();
            assert!(
                e.message.contains("must be 1 to 64 letters"),
                "{name}: {}",
                e.message
            );
        }
        let lax =
            json!({"tools": [{"type": "function", "function": {"name": "f", "strict": false}}]});
        assert!(from_request(&m(lax)).is_ok());
        // The completions endpoint has no tools: refused, not ignored.
        for (req, param) in [
            (json!({"tools": f}), "tools"),
            (json!({"tool_choice": "none"}), "tool_choice"),
            (json!({"parallel_tool_calls": true}), "parallel_tool_calls"),
        ] {
            let e = refuse_on_completions(&m(req)).unwrap_err();
            assert_eq!(e.param, Some(param));
            assert!(e.message.contains("/v1/chat/completions"), "{}", e.message);
        }
        assert!(refuse_on_completions(&m(json!({"tools": null}))).is_ok());
    }

    #[test]
    fn each_call_is_answered_right_after_it_once() {
        let call = |ids: &[&str]| {
            let calls: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
            json!({"role": "assistant", "tool_calls": calls})
        };
        let result = |id: &str| json!({"role": "tool", "tool_call_id": id, "content": "4"});
        let user = json!({"role": "user", "content": "x"});
        let fine = [
            user.clone(),
            call(&["a", "b"]),
            result("b"),
            result("a"),
            user.clone(),
        ];
        assert!(check_answers(&fine).is_ok());
        for (messages, at) in [
            // A result before its call, for another call, twice, or missing.
            (
                vec![user.clone(), result("a"), call(&["a"])],
                "messages[1]: `tool_call_id`",
            ),
            (
                vec![user.clone(), call(&["a"]), result("b")],
                "messages[2]: `tool_call_id`",
            ),
            (
                vec![user.clone(), call(&["a"]), result("a"), result("a")],
                "messages[3]: `tool_call_id`",
            ),
            (
                vec![user.clone(), call(&["a", "b"]), result("a"), user.clone()],
                "messages[3]: the calls of messages[1] must each be answered",
            ),
            (
                vec![user.clone(), call(&["a"])],
                "messages[1]: the calls of messages[1]",
            ),
        ] {
            let e = check_answers(&messages).unwrap_err();
            assert_eq!(e.param, Some("messages"));
            assert!(e.message.starts_with(at), "{}", e.message);
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
        assert_eq!(
            (t.names.clone(), t.calls()),
            (vec!["add".to_string()], false)
        );
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
        let bad = json!({"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
            "function": {"name": "add", "arguments": "{oops"}}]});
        let e = history_calls(2, &bad).unwrap_err();
        assert!(e
            .message
            .contains("messages[2]: tool_calls[0].function.arguments is not JSON"));
        for (call, why) in [
            (
                json!({"type": "function", "function": {"name": "add"}}),
                "tool_calls[0].id is missing",
            ),
            (
                json!({"id": 7, "type": "function", "function": {"name": "add"}}),
                "tool_calls[0].id must be a non-empty string",
            ),
            (
                json!({"id": "1", "function": {"name": "add"}}),
                "tool_calls[0].type must be \"function\"",
            ),
            (
                json!({"id": "1", "type": "code", "function": {"name": "add"}}),
                "tool_calls[0].type must be \"function\"",
            ),
        ] {
            let msg = json!({"role": "assistant", "tool_calls": [call]});
            let e = history_calls(3, &msg).unwrap_err();
            assert!(e.message.contains(why), "{}", e.message);
        }
    }
}
