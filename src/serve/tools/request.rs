//! What a request says of tools: `tools` and the fields that go with them, and the calls and
//! results in its history, checked as OpenAI's API checks them.

use super::{Choice, Tools};
use crate::infer::shape::schema::Grammar;
use crate::serve::api::ApiError;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The fields that only mean something with `tools`.
const WITH_TOOLS: [&str; 2] = ["tool_choice", "parallel_tool_calls"];

/// Whether the request gives `name` a value (a client may send a field as null).
fn given(m: &Map<String, Value>, name: &str) -> bool {
    m.get(name).is_some_and(|v| !v.is_null())
}

/// The request's `tools`, `tool_choice` and `parallel_tool_calls`.
pub fn from_request(m: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
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
        return match WITH_TOOLS.into_iter().find(|n| given(m, n)) {
            // As OpenAI's API answers.
            Some(name) => Err(ApiError::invalid(
                Some(name),
                format!("`{name}` is only allowed when `tools` are given"),
            )),
            None => Ok(None),
        };
    };
    let (mut names, mut args, mut stricts) = (vec![], vec![], vec![]);
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
        // Strict mode promises arguments that match the schema: a call's are held to it.
        // Others are held to a JSON object, without which the call cannot be read.
        let f = &t["function"];
        let strict = match f.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("`function.strict` must be true or false")),
        };
        let grammar = match (strict, f.get("parameters")) {
            (false, _) => Grammar::any_object(),
            // No parameters: a call without arguments.
            (true, None | Some(Value::Null)) => Grammar::from_schema(
                &json!({"type": "object", "properties": {}, "additionalProperties": false}),
            )
            .map_err(|why| bad(&why))?,
            (true, Some(p)) => Grammar::from_schema(p).map_err(|why| {
                bad(&format!(
                    "`function.parameters` cannot be held to with `strict`: {why}; change \
                     the schema, or leave `strict` out"
                ))
            })?,
        };
        names.push(name.to_string());
        args.push(Arc::new(grammar));
        stricts.push(strict);
    }
    // `{"type": "function", "function": {"name": ...}}`'s name.
    let named = |o: &Map<String, Value>| {
        let f = o.get("function")?.get("name")?.as_str()?;
        (o.get("type")? == "function").then(|| f.to_string())
    };
    let choice = match m.get("tool_choice") {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) if s == "auto" => Choice::Auto,
        Some(Value::String(s)) if s == "none" => Choice::None,
        Some(Value::String(s)) if s == "required" => Choice::Required,
        Some(Value::Object(o)) => match named(o) {
            Some(name) if names.contains(&name) => Choice::Named(name),
            Some(name) => {
                return Err(ApiError::invalid(
                    Some("tool_choice"),
                    format!("`tool_choice` names `{name}`, which is not one of `tools`"),
                ))
            }
            None => return Err(not_a_choice()),
        },
        Some(_) => return Err(not_a_choice()),
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
        args,
        strict: stricts,
        choice,
        parallel,
    }))
}

fn not_a_choice() -> ApiError {
    ApiError::invalid(
        Some("tool_choice"),
        "`tool_choice` must be \"auto\", \"none\", \"required\" or \
         {\"type\": \"function\", \"function\": {\"name\": ...}}",
    )
}

/// `tools` and its fields on `/v1/completions`, which has no functions in OpenAI's API:
/// refused rather than ignored.
pub fn refuse_on_completions(m: &Map<String, Value>) -> Result<(), ApiError> {
    let name = ["tools"]
        .into_iter()
        .chain(WITH_TOOLS)
        .find(|n| given(m, n));
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

/// That each call in the conversation is answered once, by a tool message right after its
/// assistant message, and each tool message answers such a call, as OpenAI's API requires: a
/// result out of place is a client's bookkeeping gone wrong.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
                json!({"tools": [{"type": "function", "function": {"name": "f", "strict": 1}}]}),
                "tools",
                "tools[0]: `function.strict` must be true or false",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "strict": true,
                    "parameters": {"type": "object", "properties": {"a": {"type": "string",
                    "pattern": "^x"}}}}}]}),
                "tools",
                "tools[0]: `function.parameters` cannot be held to with `strict`: #/properties/a: `pattern`",
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
