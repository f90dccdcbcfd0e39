//! `your_ai serve`: an OpenAI-compatible HTTP server over one loaded base model and any number
//! of adapters, picked per request by the `model` field. `/v1/chat/completions` (streamed as
//! server-sent events or whole), `/v1/completions` and `/v1/models`. Requests are checked here
//! ([`api`]) and generated one at a time by the thread that owns the model ([`worker`]).

pub mod access;
pub mod api;
pub mod tools;
pub mod worker;

use crate::data::chat_template::TemplateError;
use crate::data::tokenizer::Tokenizer;
use crate::infer::generate::{KvCacheType, Sampling};
use crate::infer::prompt::{chat_ids_with_tools, ChatPrompt};
use crate::infer::shape::Shape;
use access::authorize;
use api::{ApiError, Prompt, Request};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tower_http::cors::CorsLayer;
use worker::{Event, Job};

/// Request bodies above this are refused (413): a chat that fills a 128k context is ~0.5 MB.
pub const MAX_BODY: usize = 4 << 20;
/// Requests waiting for the model beyond the one running; more get a 503.
pub const QUEUE: usize = 16;

/// What the handlers share.
pub struct App {
    /// The base model's name, and the adapters' (what `/v1/models` lists).
    pub base: String,
    pub adapters: Vec<String>,
    pub tokenizer: Arc<Tokenizer>,
    pub context: usize,
    pub api_key: Option<String>,
    /// `--kv-cache`, for every request.
    pub kv_cache: KvCacheType,
    pub jobs: std::sync::mpsc::SyncSender<Job>,
    pub next_id: AtomicU64,
}

/// The routes, over `app`, with `cors` outermost (a preflight carries no API key).
pub fn router(app: Arc<App>, cors: Option<CorsLayer>) -> Router {
    let routes = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError::with(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint: use /v1/chat/completions, /v1/completions or /v1/models",
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::with(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here: the completions endpoints take POST, /v1/models takes GET"),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app);
    match cors {
        Some(c) => routes.layer(c),
        None => routes,
    }
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    let data: Vec<Value> = app.names().map(model_object).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

fn model_object(id: &String) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "your_ai"})
}

/// `GET /v1/models/{id}`: one model, as the list gives it.
async fn model(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    match app.names().find(|n| **n == id) {
        Some(n) => Json(model_object(n)).into_response(),
        None => app.no_such_model(&id).into_response(),
    }
}

impl App {
    /// The base model's name, then the adapters'.
    fn names(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.base).chain(&self.adapters)
    }

    fn no_such_model(&self, m: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{m}` does not exist: this server has {} (see /v1/models)",
                self.names()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(app, headers, body, api::chat, Kind::Chat).await
}

async fn completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(app, headers, body, api::completion, Kind::Text).await
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    /// The request field that holds the prompt, for errors about it.
    fn prompt_param(self) -> &'static str {
        match self {
            Kind::Chat => "messages",
            Kind::Text => "prompt",
        }
    }
}

async fn respond(
    app: Arc<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    parse: fn(&[u8]) -> Result<Request, ApiError>,
    kind: Kind,
) -> Response {
    // Parsing, the chat template and tokenizing take a while for a large body: off the few
    // network threads, so that they keep serving the other clients and the streams meanwhile.
    let started = tokio::task::spawn_blocking(move || start(&app, &headers, body, parse, kind))
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("reading the request failed: {e}"),
            ))
        });
    match started {
        Ok(s) if s.stream => stream(s, kind),
        Ok(s) => whole(s, kind).await,
        Err(e) => e.into_response(),
    }
}

/// A queued generation: where its events arrive, and what the response needs.
struct Started {
    rx: mpsc::UnboundedReceiver<Event>,
    id: String,
    /// The `model` the response names: the request's, or the base model's.
    model: String,
    stream: bool,
    include_usage: bool,
    /// The functions a reply may call, when it may: it is read for calls (chat only).
    calls: Option<tools::Tools>,
    /// Under a forced `tool_choice`, the start of the call the prompt ends with: the reply is
    /// it and what the model writes after it, and must be a call.
    opening: Option<String>,
}

/// Checks the request and queues its generation.
fn start(
    app: &App,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    parse: fn(&[u8]) -> Result<Request, ApiError>,
    kind: Kind,
) -> Result<Started, ApiError> {
    authorize(app, headers)?;
    let body = body.map_err(|r| ApiError {
        status: r.status(),
        message: if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is over the {} MB limit", MAX_BODY >> 20)
        } else {
            r.body_text()
        },
        param: None,
        code: None,
    })?;
    let req = parse(&body)?;
    let adapter = match req.model.as_deref() {
        None => None,
        Some(m) if m == app.base => None,
        Some(m) if app.adapters.iter().any(|a| a == m) => Some(m.to_string()),
        Some(m) => return Err(app.no_such_model(m)),
    };
    let defs = req.tools.as_ref().map(|t| t.defs.as_slice());
    // A forced call: the prompt goes on with the call's start, for the model to finish.
    let forced = req.tools.as_ref().and_then(|t| t.forced());
    let ChatPrompt { ids, opening, form } = match &req.prompt {
        Prompt::Chat(messages) => {
            chat_ids_with_tools(&app.tokenizer, messages, defs, forced.as_deref())
        }
        Prompt::Text(text) => app
            .tokenizer
            .encode_with_bos(text)
            .map(|ids| ChatPrompt {
                ids,
                opening: None,
                form: None,
            })
            .map_err(Into::into),
    }
    .map_err(|e| match e {
        crate::error::Error::Template(TemplateError::NoCallForm) => {
            ApiError::invalid(Some("tool_choice"), format!("`tool_choice`: {e}"))
        }
        crate::error::Error::Template(
            TemplateError::NoPlaceForTools | TemplateError::FailsOnTools(_),
        ) => ApiError::invalid(Some("tools"), format!("`tools`: {e}")),
        crate::error::Error::Template(TemplateError::HidesToolHistory(_)) => {
            ApiError::invalid(Some("messages"), format!("`messages`: {e}"))
        }
        e => ApiError::invalid(Some(kind.prompt_param()), e.to_string()),
    })?;
    if ids.is_empty() {
        let (param, what) = match kind {
            Kind::Chat => ("messages", "the messages make"),
            Kind::Text => ("prompt", "`prompt` is empty:"),
        };
        return Err(ApiError::invalid(
            Some(param),
            format!("{what} no tokens; give the model some text to continue from"),
        ));
    }
    let room = app.context.saturating_sub(ids.len());
    if room == 0 {
        // Where the messages alone would fit, the tools' definitions are what to cut.
        let without_tools = match (&req.prompt, defs) {
            (Prompt::Chat(messages), Some(_)) => {
                chat_ids_with_tools(&app.tokenizer, messages, None, None)
                    .ok()
                    .map(|p| p.ids.len())
                    .filter(|&n| n < app.context)
            }
            _ => None,
        };
        let (param, part, fix) = match without_tools {
            Some(n) => (
                "tools",
                format!(", {} of them the tools' definitions", ids.len() - n),
                "send fewer tools or shorter descriptions",
            ),
            None => (kind.prompt_param(), String::new(), "shorten the prompt"),
        };
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "the prompt is {} tokens{part}; this model's context is {} tokens: {fix}",
                ids.len(),
                app.context
            ),
            param: Some(param),
            code: Some("context_length_exceeded"),
        });
    }
    let max_tokens = match req.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "max_tokens {n}: the prompt is {} tokens and the context {} tokens, so at most {room} can be generated",
                    ids.len(),
                    app.context
                ),
                param: Some("max_tokens"),
                code: Some("context_length_exceeded"),
            })
        }
        Some(n) => n,
        None => room,
    };
    // Unbounded: the generation never waits for a client that reads slowly or not at all
    // (a reply is at most its max_tokens of text, held until sent).
    let (tx, rx) = mpsc::unbounded_channel();
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{n}"),
        Kind::Text => format!("cmpl-{n}"),
    };
    let model = req.model.clone().unwrap_or_else(|| app.base.clone());
    // A forced reply ends once its calls are made, not at max_tokens: a model may write on.
    // So does a reply that makes the one call wanted (`parallel_tool_calls` false).
    let done = match &req.tools {
        Some(tools) if tools.forced().is_some() || !tools.parallel => {
            let start = opening.as_ref().map(|o| o.text.clone()).unwrap_or_default();
            let tools = tools.clone();
            let over = move |text: &str| tools.reply_over(&format!("{start}{text}"));
            Some(Box::new(over) as worker::Done)
        }
        _ => None,
    };
    let shape = match (&req.tools, &req.json) {
        (Some(tools), _) => tools
            .check_writable(&app.tokenizer)
            .and_then(|()| tools.shape(form.as_ref(), opening.as_ref()))
            .map_err(|why| ApiError::invalid(Some("tools"), why))?,
        (None, Some(g)) => {
            crate::infer::shape::check_writable(g, &app.tokenizer).map_err(|why| {
                ApiError::invalid(Some("response_format"), format!("`response_format`: {why}"))
            })?;
            Shape::Json(g.clone())
        }
        (None, None) => Shape::Free,
    };
    let opening = opening.map(|o| o.text);
    let job = Job {
        adapter,
        ids,
        shape,
        sampling: Sampling {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed.unwrap_or_else(rand::random),
            max_tokens,
            ignore_eos: false,
            kv_cache: app.kv_cache,
        },
        stop: req.stop.clone(),
        done,
        events: tx,
        label: format!("{id} ({model})"),
    };
    app.jobs.try_send(job).map_err(|e| match e {
        std::sync::mpsc::TrySendError::Full(_) => ApiError::with(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            format!("{QUEUE} requests are already waiting; try again shortly"),
        ),
        std::sync::mpsc::TrySendError::Disconnected(_) => ApiError::with(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the generation thread has stopped",
        ),
    })?;
    Ok(Started {
        rx,
        id,
        model,
        stream: req.stream,
        include_usage: req.include_usage,
        calls: req.tools.filter(|t| t.calls()),
        opening,
    })
}

/// A generation the server's stop cut short, or never started.
fn stopping_error() -> ApiError {
    ApiError::with(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_stopping",
        "the server is stopping: the generation was cut short; send the request again once it is back",
    )
}

/// A reply started as the call `tool_choice` asks for that the model did not finish as one.
fn unfinished_call(finish_reason: &str, text: &str) -> ApiError {
    let why = match finish_reason {
        "length" => "max_tokens ran out first; raise it",
        _ => "what it wrote does not read as a call",
    };
    // What it wrote, for the client's logs, cut at a character boundary.
    let shown: String = text.chars().take(300).collect();
    let cut = if shown.len() < text.len() { "…" } else { "" };
    ApiError::with(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("the reply was started as the call `tool_choice` asks for, and the model did not finish it: {why} (the reply: {shown:?}{cut})"),
    )
}

/// The whole reply as one JSON object.
async fn whole(s: Started, kind: Kind) -> Response {
    let Started {
        mut rx,
        id,
        model,
        calls,
        opening,
        ..
    } = s;
    let forced = opening.is_some();
    let mut text = opening.unwrap_or_default();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Failed(e) => {
                return ApiError::with(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e)
                    .into_response()
            }
            Event::ServerStopping => return stopping_error().into_response(),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let made = calls.as_ref().and_then(|t| t.read(&text));
                if forced && made.is_none() {
                    // The same request would fail the same way: the official clients retry a
                    // 500 unless told not to.
                    let mut r = unfinished_call(finish_reason, &text).into_response();
                    r.headers_mut().insert(
                        "x-should-retry",
                        axum::http::HeaderValue::from_static("false"),
                    );
                    return r;
                }
                let choice = match (kind, made) {
                    (Kind::Chat, Some(made)) => {
                        json!({"index": 0, "finish_reason": "tool_calls", "logprobs": null,
                        "message": {"role": "assistant", "content": null,
                            "tool_calls": tools::to_json(&made, false)}})
                    }
                    (Kind::Chat, None) => {
                        json!({"index": 0, "finish_reason": finish_reason, "logprobs": null,
                        "message": {"role": "assistant", "content": text}})
                    }
                    (Kind::Text, _) => {
                        json!({"index": 0, "finish_reason": finish_reason, "logprobs": null, "text": text})
                    }
                };
                let object = match kind {
                    Kind::Chat => "chat.completion",
                    Kind::Text => "text_completion",
                };
                return Json(json!({
                    "id": id, "object": object, "created": api::now(), "model": model,
                    "choices": [choice], "usage": api::usage(prompt_tokens, completion_tokens),
                }))
                .into_response();
            }
        }
    }
    ApiError::with(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the generation ended without a result",
    )
    .into_response()
}

/// The reply as server-sent events, one chunk per piece of text, then `[DONE]`.
fn stream(s: Started, kind: Kind) -> Response {
    let Started {
        rx,
        id,
        model,
        include_usage,
        calls,
        opening: call_start,
        ..
    } = s;
    let forced = call_start.is_some();
    let created = api::now();
    let chunk = move |choice: Value, usage: Option<Value>| -> SseEvent {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let mut c = json!({"id": id, "object": object, "created": created, "model": model,
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) }});
        // As OpenAI's: with usage asked for, every chunk has the field, null until the last.
        match usage {
            Some(u) => c["usage"] = u,
            None if include_usage => c["usage"] = Value::Null,
            None => {}
        }
        SseEvent::default().data(c.to_string())
    };
    let piece = move |text: &str, finish: Option<&str>| -> Value {
        match kind {
            Kind::Chat => {
                json!({"index": 0, "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) },
                "finish_reason": finish, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
            }
        }
    };
    // First the assistant role (chat), then the text as it comes, then the finish. Where the
    // reply may be calls the role waits for it, to come with content null and the calls, as
    // OpenAI's does (the client's stream helper reads content "" from an earlier chunk).
    let role = {
        let chunk = chunk.clone();
        move |delta: Value| {
            let mut delta = delta;
            delta["role"] = json!("assistant");
            chunk(
                json!({"index": 0, "delta": delta, "finish_reason": null, "logprobs": null}),
                None,
            )
        }
    };
    let opening = match kind {
        Kind::Chat if calls.is_none() => vec![role(json!({"content": ""}))],
        _ => vec![],
    };
    // A reply that may be a call is held back while it could still be one (tools.rs).
    let held = calls.as_ref().map(|_| call_start.unwrap_or_default());
    let state = (rx, false, held);
    let body = futures_util::stream::iter(opening.into_iter().map(Ok::<_, Infallible>)).chain(
        futures_util::stream::unfold(state, move |(mut rx, done, mut held)| {
            let chunk = chunk.clone();
            let role = role.clone();
            let calls = calls.clone();
            async move {
                if done {
                    return None;
                }
                let events: Vec<SseEvent> = match rx.recv().await {
                    Some(Event::Text(t)) => match held.as_mut() {
                        Some(h) => {
                            h.push_str(&t);
                            // A forced call is never text: held to the end.
                            if forced || tools::could_be_call(h) {
                                vec![]
                            } else {
                                let text = held.take().unwrap_or_default();
                                vec![role(json!({"content": ""})), chunk(piece(&text, None), None)]
                            }
                        }
                        None => vec![chunk(piece(&t, None), None)],
                    },
                    Some(Event::Done {
                        finish_reason,
                        prompt_tokens: p,
                        completion_tokens,
                    }) => {
                        let still_held = held.take();
                        let text = still_held.clone().unwrap_or_default();
                        let made = calls.as_ref().and_then(|t| t.read(&text));
                        if forced && made.is_none() {
                            let e = unfinished_call(finish_reason, &text);
                            let err = json!({"error": {"message": e.message, "type": "server_error", "param": null, "code": e.code}});
                            let out = vec![SseEvent::default().data(err.to_string())];
                            return Some((futures_util::stream::iter(out), (rx, true, None)));
                        }
                        let mut out = vec![];
                        let finish_reason = match made {
                            Some(made) => {
                                let calls = tools::to_json(&made, true);
                                out.push(role(json!({"content": null, "tool_calls": calls})));
                                "tool_calls"
                            }
                            // Held to the end and not a call: the role opens the text.
                            None if still_held.is_some() => {
                                out.push(role(json!({"content": ""})));
                                if !text.is_empty() {
                                    out.push(chunk(piece(&text, None), None));
                                }
                                finish_reason
                            }
                            None if !text.is_empty() => {
                                out.push(chunk(piece(&text, None), None));
                                finish_reason
                            }
                            None => finish_reason,
                        };
                        out.push(chunk(piece("", Some(finish_reason)), None));
                        if include_usage {
                            out.push(chunk(Value::Null, Some(api::usage(p, completion_tokens))));
                        }
                        out.push(SseEvent::default().data("[DONE]"));
                        return Some((futures_util::stream::iter(out), (rx, true, None)));
                    }
                    Some(ev @ (Event::Failed(_) | Event::ServerStopping)) => {
                        let (message, code) = match ev {
                            Event::Failed(e) => (e, None),
                            _ => (stopping_error().message, Some("server_stopping")),
                        };
                        let err = json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}});
                        return Some((
                            futures_util::stream::iter(vec![SseEvent::default().data(err.to_string())]),
                            (rx, true, None),
                        ));
                    }
                    None => return None,
                };
                Some((futures_util::stream::iter(events), (rx, false, held)))
            }
        })
        .flatten()
        .map(Ok::<_, Infallible>),
    );
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}
