//! The OpenAI wire format: requests parsed and checked field by field (a bad one is a 4xx with
//! an OpenAI-style error body naming the field), and the response objects.

use crate::infer::shape::schema::Grammar;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::Arc;

/// An error as OpenAI's API reports it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: None,
        }
    }

    pub fn with(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: Some(code),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "param": self.param, "code": self.code,
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        // A full queue or a stopping server: clients that honour it (OpenAI's SDKs) wait
        // before retrying rather than hammer.
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// What the request asks the model for.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `/v1/chat/completions`: messages for the model's chat template.
    Chat(Vec<Value>),
    /// `/v1/completions`: text to continue as it is.
    Text(String),
}

/// A checked request of either endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    /// None: a fresh one per request, as OpenAI's API does.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// The functions the model may call (chat only).
    pub tools: Option<super::tools::Tools>,
    /// What JSON `response_format` holds the reply to (None: plain text).
    pub json: Option<Arc<Grammar>>,
}

/// The JSON object of a request body.
fn object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::invalid(
            None,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// A `/v1/chat/completions` body.
pub fn chat(body: &[u8]) -> Result<Request, ApiError> {
    let m = object(body)?;
    let messages = match m.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(Some("messages"), "`messages` is empty"))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` must be an array of {\"role\", \"content\"} objects",
            ))
        }
        None => {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` is missing: give the conversation as an array of {\"role\", \"content\"} objects",
            ))
        }
    };
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, msg)| message(i, msg))
        .collect::<Result<Vec<_>, _>>()?;
    super::tools::check_answers(&messages)?;
    let tools = super::tools::from_request(&m)?;
    let mut request = common(&m, Prompt::Chat(messages), "max_completion_tokens")?;
    if request.json.is_some() && tools.is_some() {
        return Err(ApiError::invalid(
            Some("response_format"),
            "`response_format` JSON with `tools`: a reply is either calls or JSON here, not \
             one of the two as the model chooses; send one of them",
        ));
    }
    // A forced call is held to its close, which a stop string could cut: no call, a 500.
    if tools.as_ref().is_some_and(|t| t.forced().is_some()) && !request.stop.is_empty() {
        return Err(ApiError::invalid(
            Some("stop"),
            "`stop` with a forced `tool_choice`: the reply is a call, held whole to its \
             close, which a stop string could cut; leave `stop` out",
        ));
    }
    request.tools = tools;
    Ok(request)
}

/// A `/v1/completions` body.
pub fn completion(body: &[u8]) -> Result<Request, ApiError> {
    let m = object(body)?;
    let prompt = match m.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "`prompt` must be a string (one prompt per request)",
            ))
        }
        None => return Err(ApiError::invalid(Some("prompt"), "`prompt` is missing")),
    };
    super::tools::refuse_on_completions(&m)?;
    common(&m, Prompt::Text(prompt), "max_tokens")
}

/// One message, as the chat template takes it: a role and text content (text parts joined).
fn message(i: usize, msg: &Value) -> Result<Value, ApiError> {
    let bad = |what: &str| ApiError::invalid(Some("messages"), format!("messages[{i}]: {what}"));
    let role = msg
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`role` is missing"))?;
    if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
        return Err(bad(&format!(
            "role `{role}` is not one of system, developer, user, assistant, tool"
        )));
    }
    let calls = super::tools::history_calls(i, msg)?;
    if calls.is_some() && role != "assistant" {
        return Err(bad("`tool_calls` is only for assistant messages"));
    }
    if role == "tool" {
        let answers = msg.get("tool_call_id").and_then(Value::as_str);
        if answers.is_none_or(str::is_empty) {
            return Err(bad(
                "a tool message needs the `tool_call_id` of the call it answers",
            ));
        }
        if msg.get("content").is_none_or(Value::is_null) {
            return Err(bad("a tool message needs `content`, the call's result"));
        }
    }
    let content = match msg.get("content") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(Value::Array(parts)) => {
            crate::data::message_text::text_of_parts(parts).map_err(|why| bad(&why))?
        }
        Some(_) => return Err(bad("`content` must be a string or an array of text parts")),
    };
    // The developer role is OpenAI's newer name for system.
    let role = if role == "developer" { "system" } else { role };
    let mut out = json!({"role": role, "content": content});
    if let Some(calls) = calls {
        out["tool_calls"] = calls;
    }
    // A tool's result names the call it answers (templates that show it read these).
    for key in ["tool_call_id", "name"] {
        if let Some(v) = msg.get(key).filter(|v| v.is_string()) {
            out[key] = v.clone();
        }
    }
    Ok(out)
}

/// The fields both endpoints share.
fn common(
    m: &serde_json::Map<String, Value>,
    prompt: Prompt,
    max_alias: &'static str,
) -> Result<Request, ApiError> {
    let model = match m.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a string")),
    };
    unsupported(m)?;
    // The first of the two names given a value (a client may send the other as null).
    let given = |name: &'static str| m.get(name).filter(|v| !v.is_null()).map(|v| (name, v));
    let max_tokens = match given("max_tokens").or_else(|| given(max_alias)) {
        None => None,
        Some((name, v)) => match v.as_u64() {
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            _ => {
                return Err(ApiError::invalid(
                    Some(name),
                    format!("`{name}` {v} must be a positive integer"),
                ))
            }
        },
    };
    let number =
        |name: &'static str, default: f64, ok: fn(f64) -> bool, rule: &str| match m.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().filter(|x| ok(*x)).ok_or_else(|| {
                ApiError::invalid(Some(name), format!("`{name}` {v} must be {rule}"))
            }),
        };
    let temperature = number(
        "temperature",
        1.0,
        |t| (0.0..=2.0).contains(&t),
        "between 0 and 2",
    )?;
    let top_p = number("top_p", 1.0, |p| p > 0.0 && p <= 1.0, "in (0, 1]")?;
    let seed = match m.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| ApiError::invalid(Some("seed"), "`seed` must be an integer"))?,
        ),
    };
    let stop = match m.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid(Some("stop"), "`stop` entries must be strings"))?,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stop"),
                "`stop` must be a string or an array of at most 4 strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            Some("stop"),
            "`stop` strings must not be empty",
        ));
    }
    if let Some(n) = m
        .get("n")
        .filter(|n| !n.is_null() && n.as_f64() != Some(1.0))
    {
        return Err(ApiError::invalid(
            Some("n"),
            format!("`n` {n}: one choice per request is supported"),
        ));
    }
    let flag = |param: &'static str, name: &str, v: Option<&Value>| match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(
            Some(param),
            format!("`{name}` must be true or false"),
        )),
    };
    let json = response_format(m.get("response_format"))?;
    let stream = flag("stream", "stream", m.get("stream"))?;
    let include_usage = flag(
        "stream_options",
        "stream_options.include_usage",
        m.get("stream_options").and_then(|o| o.get("include_usage")),
    )?;
    Ok(Request {
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        stream,
        include_usage,
        tools: None,
        json,
    })
}

/// The grammar `response_format` holds the reply to: any JSON object (`json_object`), or a
/// JSON Schema's (`json_schema`); None for plain text, the default. A schema this server
/// cannot hold a reply to is refused, naming the keyword and its place.
fn response_format(v: Option<&Value>) -> Result<Option<Arc<Grammar>>, ApiError> {
    let bad = |why: String| Err(ApiError::invalid(Some("response_format"), why));
    let o = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return bad(
                "`response_format` must be an object such as {\"type\": \"json_object\"}".into(),
            )
        }
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Arc::new(Grammar::any_object()))),
        Some("json_schema") => {
            let Some(spec) = o.get("json_schema").and_then(Value::as_object) else {
                return bad(
                    "`response_format` json_schema needs `json_schema`: {\"name\", \"schema\"}"
                        .into(),
                );
            };
            match spec.get("schema") {
                None | Some(Value::Null) => Ok(Some(Arc::new(Grammar::any_object()))),
                Some(schema) => match Grammar::from_schema(schema) {
                    Ok(g) => Ok(Some(Arc::new(g))),
                    Err(why) => bad(format!("`response_format` json_schema: {why}")),
                },
            }
        }
        Some(other) => bad(format!(
            "`response_format` type `{other}` is not one of text, json_object, json_schema"
        )),
        None => bad("`response_format` needs a `type`: text, json_object or json_schema".into()),
    }
}

/// Refuses what a client asks for and this server cannot give, rather than answer as if it
/// had: token log-probabilities, the prompt echoed, several candidates, an insertion suffix,
/// repetition penalties, token biases, audio. (Tools, and what
/// of them is refused, are in tools.rs.)
fn unsupported(m: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    let asks = |name: &str| match m.get(name) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => match name {
            // `best_of` 1 and 0 log-probabilities are the defaults.
            "best_of" => n.as_f64() != Some(1.0),
            _ => n.as_f64() != Some(0.0),
        },
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Object(o)) if name == "logit_bias" => !o.is_empty(),
        Some(Value::Array(a)) if name == "modalities" => a.iter().any(|m| m != "text"),
        Some(_) => true,
    };
    let what = [
        ("logprobs", "token log-probabilities"),
        ("top_logprobs", "token log-probabilities"),
        ("echo", "echoing the prompt"),
        ("best_of", "several candidates"),
        ("suffix", "insertion (a suffix)"),
        ("frequency_penalty", "repetition penalties"),
        ("presence_penalty", "repetition penalties"),
        ("logit_bias", "token biases"),
        ("modalities", "output other than text"),
        ("audio", "audio output"),
        (
            "functions",
            "the deprecated `functions` (give them as `tools`)",
        ),
        (
            "function_call",
            "the deprecated `function_call` (give `tool_choice`)",
        ),
    ];
    match what.into_iter().find(|(name, _)| asks(name)) {
        Some((name, feature)) => Err(ApiError::invalid(
            Some(name),
            format!("`{name}`: this server does not support {feature}; leave the field out"),
        )),
        None => Ok(()),
    }
}

/// Seconds since the epoch, for the `created` fields.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_or_stopping_server_says_when_to_retry() {
        let busy = ApiError::with(StatusCode::SERVICE_UNAVAILABLE, "server_busy", "full");
        let r = busy.into_response();
        assert_eq!(r.headers()["retry-after"], "1");
        let bad = ApiError::invalid(Some("n"), "n must be 1").into_response();
        assert!(bad.headers().get("retry-after").is_none());
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let ok = chat(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stop":"x","temperature":0}"#).unwrap();
        assert_eq!(ok.max_tokens, Some(5));
        assert_eq!(ok.stop, vec!["x"]);
        assert_eq!(ok.temperature, 0.0);
        let parts = chat(br#"{"messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(
            parts.prompt,
            Prompt::Chat(vec![json!({"role": "system", "content": "ab"})])
        );
        for (body, param) in [
            (&br#"{"messages": []}"#[..], Some("messages")),
            (br#"{"model": "m"}"#, Some("messages")),
            (br#"{"messages":[{"content":"x"}]}"#, Some("messages")),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                Some("max_tokens"),
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Some("temperature"),
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
                Some("n"),
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                Some("stop"),
            ),
            (br#"[1,2]"#, None),
            (br#"{"messages": "#, None),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param, param, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            completion(br#"{"prompt": ["once"]}"#).unwrap().prompt,
            Prompt::Text("once".into())
        );
        assert!(completion(br#"{"prompt": ["a", "b"]}"#).is_err());
    }

    #[test]
    fn aliases_nulls_and_unsupported_fields() {
        let msg = r#""messages":[{"role":"user","content":"x"}]"#;
        let chat_with = |rest: &str| chat(format!("{{{msg},{rest}}}").as_bytes());
        // A null max_tokens leaves the newer name to decide; errors name the field given.
        let r = chat_with(r#""max_tokens":null,"max_completion_tokens":3"#).unwrap();
        assert_eq!(r.max_tokens, Some(3));
        let e = chat_with(r#""max_completion_tokens":0"#).unwrap_err();
        assert_eq!(e.param, Some("max_completion_tokens"));
        assert!(
            e.message.contains("`max_completion_tokens`"),
            "{}",
            e.message
        );
        assert!(chat_with(r#""n":1.0"#).is_ok());
        let e = chat_with(r#""stream_options":{"include_usage":"yes"}"#).unwrap_err();
        assert!(e.message.contains("include_usage"), "{}", e.message);
        // Defaults pass; anything that asks for more is refused, naming the field.
        for ok in [
            r#""logprobs":false"#,
            r#""logprobs":null"#,
            r#""top_logprobs":0"#,
            r#""best_of":1"#,
            r#""echo":false"#,
            r#""suffix":"""#,
            r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"auto""#,
            r#""response_format":{"type":"text"}"#,
            r#""response_format":null"#,
        ] {
            assert!(chat_with(ok).is_ok(), "{ok}");
        }
        // Any object, or a schema's; a schema that cannot be held to, another type or a tool
        // alongside are refused.
        let json = |rest: &str| chat_with(rest).unwrap().json;
        assert_eq!(
            json(r#""response_format":{"type":"json_object"}"#).as_deref(),
            Some(&Grammar::any_object())
        );
        assert!(json(r#""response_format":{"type":"text"}"#).is_none());
        let schema = r#""response_format":{"type":"json_schema","json_schema":{"name":"n","strict":true,"schema":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}}}"#;
        assert!(json(schema).is_some_and(|g| *g != Grammar::any_object()));
        let tool = r#""tools":[{"type":"function","function":{"name":"f"}}]"#;
        for (bad, says) in [
            (
                r#""response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object","properties":{"a":{"type":"string","format":"date"}}}}}"#,
                "#/properties/a: `format` is not supported",
            ),
            (
                r#""response_format":{"type":"json_schema"}"#,
                "needs `json_schema`",
            ),
            (r#""response_format":{"type":"yaml"}"#, "`yaml`"),
            (r#""response_format":"json""#, "must be an object"),
            (
                &format!(r#""response_format":{{"type":"json_object"}},{tool}"#),
                "`tools`",
            ),
        ] {
            let e = chat_with(bad).unwrap_err();
            assert_eq!(e.param, Some("response_format"), "{bad}");
            assert!(e.message.contains(says), "{}", e.message);
        }
        // A stop string would cut a forced call's held close; where the model chooses, a
        // call it cuts is text.
        let forced = format!(r#"{tool},"tool_choice":"required","stop":"x""#);
        let e = chat_with(&forced).unwrap_err();
        assert_eq!(e.param, Some("stop"));
        assert!(e.message.contains("forced `tool_choice`"), "{}", e.message);
        assert!(chat_with(&format!(r#"{tool},"stop":"x""#)).is_ok());
        for (bad, param) in [
            (r#""logprobs":true"#, "logprobs"),
            (r#""top_logprobs":2"#, "top_logprobs"),
            (r#""echo":true"#, "echo"),
            (r#""best_of":3"#, "best_of"),
            (r#""suffix":"end""#, "suffix"),
            (r#""frequency_penalty":0.5"#, "frequency_penalty"),
            (r#""presence_penalty":"abc""#, "presence_penalty"),
            (r#""logit_bias":{"19556":-100}"#, "logit_bias"),
            (r#""logit_bias":"junk""#, "logit_bias"),
            (r#""modalities":["text","audio"]"#, "modalities"),
            (r#""audio":{"voice":"x","format":"wav"}"#, "audio"),
            (r#""functions":[{"name":"f","parameters":{}}]"#, "functions"),
            (r#""function_call":"auto""#, "function_call"),
        ] {
            let e = chat_with(bad).unwrap_err();
            assert_eq!(e.param, Some(param), "{bad}");
            assert!(e.message.contains("does not support"), "{}", e.message);
        }
        // An earlier call and its result go to the template: the arguments as an object.
        let call = r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{\"a\":2}"}}]},{"role":"tool","tool_call_id":"1","content":"4"}]}"#;
        let r = chat(call.as_bytes()).unwrap();
        let Prompt::Chat(m) = &r.prompt else {
            panic!("{r:?}")
        };
        assert_eq!(m[1]["tool_calls"][0]["function"]["arguments"]["a"], 2);
        assert_eq!(m[2]["tool_call_id"], "1");
        // Tool turns as OpenAI's API takes them, or refused naming the message.
        let calls = r#""tool_calls":[{"id":"1","type":"function","function":{"name":"f"}}]"#;
        for (bad, why) in [
            (
                format!(r#"{{"role":"user","content":"x",{calls}}}"#),
                "messages[0]: `tool_calls` is only for assistant",
            ),
            (
                r#"{"role":"tool","content":"4"}"#.into(),
                "messages[0]: a tool message needs the `tool_call_id`",
            ),
            (
                r#"{"role":"tool","tool_call_id":"1"}"#.into(),
                "messages[0]: a tool message needs `content`",
            ),
        ] {
            let e = chat(format!(r#"{{"messages":[{bad}]}}"#).as_bytes()).unwrap_err();
            assert_eq!(e.param, Some("messages"));
            assert!(e.message.starts_with(why), "{}", e.message);
        }
        // Their defaults ask for nothing.
        for ok in [
            r#""frequency_penalty":0"#,
            r#""logit_bias":{}"#,
            r#""modalities":["text"]"#,
        ] {
            assert!(chat_with(ok).is_ok(), "{ok}");
        }
        // The completions endpoint's logprobs is a count.
        assert!(completion(br#"{"prompt":"a","logprobs":5}"#).is_err());
        assert!(completion(br#"{"prompt":"a","logprobs":0}"#).is_ok());
    }
}
