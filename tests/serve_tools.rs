//! Function calling through `your_ai serve` with the official `openai` client (see
//! tests/fixtures/openai_tools.py), and the refusals of a template that has no place for it.

mod common;
#[path = "common/server.rs"]
mod server;

use server::{adapter, base_name, http, Server, KEY};
use std::path::Path;

/// Function calling with the official client: served with a chat template that takes tools
/// (Qwen 2.5's: calls as `<tool_call>` blocks), SmolLM2 follows its earlier calls in the
/// conversation and calls `get_weather` for London; the reply comes back as `tool_calls`,
/// whole and streamed, and the call and its result go back in the next request. Served with
/// its own template, which has no place for tools or earlier calls, such requests are refused.
#[test]
fn tools_go_to_the_template_and_calls_come_back_as_tool_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(&tmp.path().join("adapter"));
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates/qwen25.jinja");
    let server = Server::start_with(
        tmp.path(),
        &adapter,
        KEY,
        &["--chat-template", template.to_str().unwrap()],
    );
    let got = server.client("openai_tools.py", &[&base_name()]);
    let london = serde_json::json!([{"name": "get_weather", "arguments": r#"{"city":"London"}"#}]);
    let whole = &got["whole"];
    assert_eq!(whole["finish_reason"], "tool_calls", "{got}");
    assert!(whole["content"].is_null(), "{got}");
    let calls: Vec<serde_json::Value> = whole["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::json!({"name": c["name"], "arguments": c["arguments"]}))
        .collect();
    assert_eq!(serde_json::Value::Array(calls), london, "{got}");
    assert!(whole["calls"][0]["id"]
        .as_str()
        .unwrap()
        .starts_with("call_"));
    assert_eq!(got["streamed"]["finish_reason"], "tool_calls", "{got}");
    assert_eq!(got["streamed"]["calls"], london, "{got}");
    assert_eq!(got["streamed"]["content"], "", "{got}");
    let helper = &got["streamed"]["helper"];
    assert!(helper["content"].is_null(), "{got}");
    assert_eq!(helper["calls"], serde_json::json!(["get_weather"]), "{got}");
    // Left to itself the model answers that conversation in text; forced, the reply is a call
    // whose arguments are a JSON object, whole and streamed.
    let unforced = &got["forced"]["unforced"];
    assert_eq!(unforced["calls"], 0, "{got}");
    for label in ["named", "required"] {
        let forced = &got["forced"][label];
        assert_eq!(forced["finish_reason"], "tool_calls", "{label}: {got}");
        assert_eq!(
            forced["calls"],
            serde_json::json!(["get_weather"]),
            "{label}: {got}"
        );
        assert!(forced["arguments"][0].is_object(), "{label}: {got}");
        assert_eq!(forced["streamed"], forced["calls"], "{label}: {got}");
        // A forced reply ends once its calls are made: with parallel calls, at the text the
        // model writes after its call (it wrote on to end of turn, 60 tokens in all); without,
        // at its call's close, sooner still.
        assert_eq!(forced["one"], forced["calls"], "{label}: {got}");
        let tokens = |k: &str| forced[k].as_u64().unwrap();
        assert!(tokens("one_tokens") < tokens("tokens"), "{label}: {got}");
        assert!(tokens("tokens") < 60, "{label}: {got}");
    }
    let several = &got["forced"]["several"];
    assert_eq!(several["finish_reason"], "tool_calls", "{got}");
    let names = ["lookup_climate_record", "fetch_tide_table"];
    assert!(several["calls"]
        .as_array()
        .is_some_and(|c| !c.is_empty() && c.iter().all(|n| names.iter().any(|m| n == m))));
    // Strict: the arguments keep to the schema (the model, left to itself, writes no `unit`,
    // as `whole` shows), whole and streamed, the choice the model's or forced.
    for label in ["auto", "required"] {
        let strict = &got["strict"][label];
        assert_eq!(strict["finish_reason"], "tool_calls", "{label}: {got}");
        for key in ["calls", "streamed"] {
            let calls = strict[key].as_array().unwrap();
            assert!(!calls.is_empty(), "{label}: {got}");
            for call in calls {
                assert_eq!(call[0], "get_weather", "{label}: {got}");
                let args = call[1].as_object().unwrap();
                let keys: Vec<&str> = args.keys().map(String::as_str).collect();
                assert_eq!(keys, ["city", "unit"], "{label}: {got}");
                assert!(args["city"].is_string(), "{label}: {got}");
                assert!(
                    ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap_or("")),
                    "{label}: {got}"
                );
            }
        }
    }
    // Tools that fill the context: the 400 names them, not the messages.
    let long = "a tool that does many things ".repeat(2000);
    let body = serde_json::json!({"messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": long}}]});
    let (status, resp) = http(
        &server.url,
        "POST",
        "/v1/chat/completions",
        true,
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 400, "{resp}");
    assert!(
        resp.contains(r#""param":"tools""#)
            && resp.contains("context_length_exceeded")
            && resp.contains("of them the tools' definitions"),
        "{resp}"
    );
    // The round trip is accepted and answered in text.
    let after = &got["after"];
    assert_ne!(after["finish_reason"], "tool_calls", "{got}");
    assert!(
        !after["content"].as_str().unwrap_or_default().is_empty(),
        "{got}"
    );

    // The model's own template leaves tools out, and shows an earlier call-only turn as an
    // empty one: refused, naming `tools`, and `messages`.
    std::fs::create_dir_all(tmp.path().join("own")).unwrap();
    let own = Server::start(&tmp.path().join("own"), &adapter);
    let with_tools = serde_json::json!({"messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}]});
    let with_history = serde_json::json!({"messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c0", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "sunny"}]});
    for (body, param, why) in [
        (with_tools, "tools", "no place for tools"),
        (with_history, "messages", "does not show earlier calls"),
    ] {
        let body = body.to_string();
        let (status, resp) = http(
            &own.url,
            "POST",
            "/v1/chat/completions",
            true,
            body.as_bytes(),
        );
        assert_eq!(status, 400, "{resp}");
        let named = format!(r#""param":"{param}""#);
        assert!(resp.contains(&named) && resp.contains(why), "{resp}");
    }
}
