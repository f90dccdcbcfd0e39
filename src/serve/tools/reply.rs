//! Reading a reply as calls, in the forms chat models write them, and writing them as
//! OpenAI's `tool_calls`.

use super::Call;
use serde_json::{json, Value};

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
pub(super) fn leading(text: &str, names: &[String], whole: bool) -> Option<Vec<Call>> {
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

/// Whether a reply started as a call has made every call it will, so that its generation can
/// stop there instead of running on to `max_tokens`: its first call is whole, and no other may
/// follow (`parallel` off), or what follows its whole calls cannot begin another.
pub(super) fn calls_over(text: &str, names: &[String], parallel: bool) -> bool {
    let t = text.trim_start();
    if !t.starts_with("<tool_call>") {
        // A bare object, or an array of them (Mistral's after its tag), holds every call.
        let t = t.strip_prefix("[TOOL_CALLS]").unwrap_or(t).trim_start();
        let mut values = serde_json::Deserializer::from_str(t).into_iter::<Value>();
        return values.next().is_some_and(|v| v.is_ok());
    }
    let mut rest = t;
    while let Some(after) = rest.strip_prefix("<tool_call>") {
        let Some((body, tail)) = after.split_once("</tool_call>") else {
            return false;
        };
        let is_call = serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| call(&v, names))
            .is_some();
        // Reading stops at the first block that is not a call.
        if !parallel || !is_call {
            return true;
        }
        rest = tail.trim_start();
    }
    !rest.is_empty() && !"<tool_call>".starts_with(rest)
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
    use crate::serve::tools::request::from_request;
    use crate::serve::tools::{Choice, Tools};

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
        // The same tools under `tool_choice` "required": the reply was started as a call.
        let forced = |t: &Tools| Tools {
            choice: Choice::Required,
            ..t.clone()
        };
        let tools = json!([{"type": "function", "function": {"name": "add"}}]);
        let two = "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1}}</tool_call>\
                   <tool_call>{\"name\":\"add\",\"arguments\":{\"a\":2}}</tool_call>";
        for (parallel, want) in [(json!(null), 2), (json!(true), 2), (json!(false), 1)] {
            let t = from_request(&m(json!({"tools": tools, "parallel_tool_calls": parallel})))
                .unwrap()
                .unwrap();
            let calls = t.read(two).unwrap();
            assert_eq!(calls.len(), want, "{parallel}");
            assert_eq!(calls[0].arguments, r#"{"a":1}"#);
            // Text after the calls: not a call, unless the reply was started as one.
            let more = format!("{two}\nThe answer is 3.");
            assert_eq!(t.read(&more), None);
            assert_eq!(forced(&t).read(&more), Some(calls));
        }
        let t = from_request(&m(json!({"tools": tools}))).unwrap().unwrap();
        // Started as a call: a later call cut short or to another function ends the calls.
        let one = "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1}}</tool_call>";
        for after in [
            "\n<tool_call>\n",
            "<tool_call>{\"name\":\"rm\"}</tool_call>",
        ] {
            let text = format!("{one}{after}");
            assert_eq!(forced(&t).read(&text).map(|c| c.len()), Some(1), "{text}");
            assert_eq!(t.read(&text), None, "{text}");
        }
        let bare = r#"{"name": "add", "parameters": {"a": 1}} Done."#;
        assert_eq!(
            (t.read(bare), forced(&t).read(bare).map(|c| c.len())),
            (None, Some(1))
        );
    }
    #[test]
    fn a_forced_reply_is_over_once_no_call_can_follow() {
        let one = "<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1}}</tool_call>";
        let over = |text: &str, parallel: bool| calls_over(text, &names(), parallel);
        // Still being written.
        for text in [
            "<tool_call>{\"name\":\"add\"",
            "{\"name\": \"add\", \"arguments\": {",
        ] {
            assert!(!over(text, true) && !over(text, false), "{text}");
        }
        // A call may follow: over only without parallel calls.
        for after in ["", "\n", "\n<tool", "\n<tool_call>{\"name\""] {
            let text = format!("{one}{after}");
            assert!(!over(&text, true) && over(&text, false), "{text:?}");
        }
        // Text, or a block that is no call, ends the calls.
        for after in ["\nThe answer", "<tool_call>{\"name\":\"rm\"}</tool_call>"] {
            assert!(over(&format!("{one}{after}"), true), "{after:?}");
        }
        // A bare object or a list holds every call: over once it is whole.
        for text in [
            "{\"name\": \"add\", \"parameters\": {\"a\": 1}}",
            "[TOOL_CALLS] [{\"name\": \"add\", \"arguments\": {}}]",
        ] {
            assert!(over(text, true), "{text}");
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
}
