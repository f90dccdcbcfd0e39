//! `your_ai serve` driven over real HTTP, as its users drive it: the official `openai` Python
//! client (models, chat whole and streamed, an adapter by name, completions), checked against
//! `your_ai generate` on the same prompt; and plain HTTP for bad requests, each a 4xx with an
//! OpenAI-style error body, after which the server still answers. The Python client comes from
//! the virtual environment `scripts/test.sh` sets up (or `YOUR_AI_PYTHON`).

mod common;
#[path = "common/server.rs"]
mod server;

use common::cli;
use server::{adapter, base_name, generate, http, Server, KEY, QUESTION};
use std::io::{Read, Write};
use std::process::Command;

#[test]
fn the_openai_client_gets_what_generate_gives_and_bad_requests_get_4xx() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(&tmp.path().join("adapter"));
    let server = Server::start(tmp.path(), &adapter);
    let base = base_name();
    let max_tokens = 12;

    let args = [&base, "brellonia", QUESTION, &max_tokens.to_string()];
    let got = server.client("openai_client.py", &args);
    assert_eq!(got["models"], serde_json::json!([base, "brellonia"]));
    for (name, dir) in [
        (base.as_str(), None),
        ("brellonia", Some(adapter.as_path())),
    ] {
        let r = &got[name];
        let want = generate(dir, max_tokens);
        assert_eq!(r["text"], want.as_str(), "{name}");
        assert_eq!(r["streamed"], want.as_str(), "{name}: streamed");
        assert!(
            r["stream_pieces"].as_u64().unwrap() > 1,
            "{name}: one piece"
        );
        assert_eq!(r["model"], name);
        assert_eq!(r["usage"], r["stream_usage"], "{name}");
        assert_eq!(r["finish_reason"], r["stream_finish_reason"], "{name}");
        let u = &r["usage"];
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        assert!(u["completion_tokens"].as_u64().unwrap() <= max_tokens as u64);
    }
    assert_ne!(got[base.as_str()]["text"], got["brellonia"]["text"]);
    assert!(!got["completion"]["text"].as_str().unwrap().is_empty());

    // Bad requests: each a 4xx with an OpenAI error body; the server answers after each.
    let chat = "/v1/chat/completions";
    let big = vec![b' '; 5 << 20];
    let long_prompt = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "word ".repeat(9000)
    );
    // (method, path, with the API key, body, status, what the message says)
    type Case<'a> = (&'a str, &'a str, bool, &'a [u8], u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", chat, true, b"{not json", 400, "not valid JSON"),
        (
            "POST",
            chat,
            true,
            br#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#,
            404,
            "model_not_found",
        ),
        (
            "POST",
            chat,
            true,
            br#"{"model":"brellonia"}"#,
            400,
            "messages",
        ),
        (
            "POST",
            chat,
            true,
            br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":-5}"#,
            400,
            "max_tokens",
        ),
        (
            "POST",
            chat,
            true,
            br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":100000000}"#,
            400,
            "context_length_exceeded",
        ),
        (
            "POST",
            chat,
            true,
            long_prompt.as_bytes(),
            400,
            "context_length_exceeded",
        ),
        ("POST", chat, true, &big, 413, "limit"),
        (
            "POST",
            chat,
            false,
            br#"{"messages":[{"role":"user","content":"hi"}]}"#,
            401,
            "API key",
        ),
        ("GET", "/v1/nothing", true, b"", 404, "no such endpoint"),
        // A wrong method gets a JSON error too; an empty prompt is the client's error.
        ("GET", chat, true, b"", 405, "not allowed"),
        (
            "POST",
            "/v1/completions",
            true,
            br#"{"prompt":"","max_tokens":3}"#,
            400,
            "prompt",
        ),
        (
            "POST",
            chat,
            true,
            br#"{"messages":[{"role":"user","content":"hi"}],"logprobs":true}"#,
            400,
            "does not support",
        ),
        ("GET", "/v1/models/nope", true, b"", 404, "model_not_found"),
    ];
    for (method, path, auth, body, status, says) in cases {
        let (got, text) = http(&server.url, method, path, auth, body);
        assert_eq!(got, status, "{method} {path}: {text}");
        let err: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        assert!(err["error"]["message"].is_string(), "{text}");
        assert!(text.contains(says), "{method} {path}: {text}");
        let (ok, models) = http(&server.url, "GET", "/v1/models", true, b"");
        assert_eq!(ok, 200, "after {method} {path}: {models}");
    }
    let (ok, one) = http(&server.url, "GET", "/v1/models/brellonia", true, b"");
    assert_eq!(ok, 200, "{one}");
    assert!(one.contains(r#""id":"brellonia""#), "{one}");
}

/// A streaming client that goes away stops its generation: the server logs it and answers the
/// next request (which would otherwise wait behind thousands of tokens).
#[test]
fn a_client_that_disconnects_stops_its_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(&tmp.path().join("adapter"));
    let server = Server::start(tmp.path(), &adapter);
    // Read until some content has streamed, then hang up.
    drop(long_stream(&server));
    let (status, text) = http(
        &server.url,
        "POST",
        "/v1/chat/completions",
        true,
        br#"{"messages":[{"role":"user","content":"Say hi."}],"max_tokens":3,"temperature":0}"#,
    );
    assert_eq!(status, 200, "{text}");
    let log = server.log();
    assert!(log.contains("client gone: stopped"), "{log}");
    let stopped = log
        .lines()
        .find(|l| l.contains("client gone: stopped"))
        .unwrap();
    let generated: usize = stopped
        .split(" generated")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    assert!(generated < 4000, "{stopped}");
    // One that goes away while its long prompt is processed: stopped between the prompt's
    // pieces, nothing generated.
    let addr = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":50,"stream":true}}"#,
        "hello ".repeat(3000)
    );
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(s);
    let (status, text) = http(
        &server.url,
        "POST",
        "/v1/completions",
        true,
        br#"{"prompt":"Hi","max_tokens":1}"#,
    );
    assert_eq!(status, 200, "{text}");
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains(" prompt + 0 generated tokens") && l.contains("client gone")),
        "{log}"
    );
}

/// SIGTERM while a generation runs: it is cut short at its next token (its client gets an
/// error event, not a reply passed off as whole), and the server exits within seconds rather
/// than after thousands of tokens.
#[test]
fn stopping_the_server_cuts_the_running_generation_short() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(&tmp.path().join("adapter"));
    let mut server = Server::start(tmp.path(), &adapter);
    let (mut s, mut seen) = long_stream(&server);
    let mut buf = [0u8; 4096];
    let start = std::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed().as_secs() < 30,
            "still running 30 s after SIGTERM: {}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}: {}", server.log());
    // The rest of the stream: an error event saying why, and no [DONE].
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("server_stopping"), "{seen}");
    assert!(!seen.contains("[DONE]"), "{seen}");
    let log = server.log();
    assert!(log.contains("cut short: the server is stopping"), "{log}");
}

/// A key given with spaces around it (as from a file or a shell variable) is the key without
/// them: a client's token, trimmed, matches it.
#[test]
fn the_api_key_is_taken_without_surrounding_spaces() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(&tmp.path().join("adapter"));
    let server = Server::start_with_key(tmp.path(), &adapter, &format!(" {KEY}\n"));
    let (status, text) = http(&server.url, "GET", "/v1/models", true, b"");
    assert_eq!(status, 200, "{text}");
    let (status, text) = http(&server.url, "GET", "/v1/models", false, b"");
    assert_eq!(status, 401, "{text}");
}

/// Large prompts are read and tokenized off the server's network threads: while four clients'
/// multi-megabyte prompts are being tokenized (each then refused as over the context), another
/// client's request is answered first.
#[test]
fn large_prompts_being_tokenized_hold_up_no_other_client() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(&tmp.path().join("adapter"));
    let server = Server::start(tmp.path(), &adapter);
    let body = serde_json::to_vec(&serde_json::json!({
        "messages": [{"role": "user", "content": "hello world ".repeat(300_000)}],
        "max_tokens": 4,
    }))
    .unwrap();
    let large: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (server.url.clone(), body.clone());
            std::thread::spawn(move || {
                let r = http(&url, "POST", "/v1/chat/completions", true, &body);
                (r, std::time::Instant::now())
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, text) = http(&server.url, "GET", "/v1/models", true, b"");
    let answered = std::time::Instant::now();
    assert_eq!(status, 200, "{text}");
    for t in large {
        let ((status, text), done) = t.join().unwrap();
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("context_length_exceeded"), "{text}");
        assert!(
            done > answered,
            "a large prompt was answered before the small request"
        );
    }
}

/// With `stream_options.include_usage`, every chunk carries `usage` (null until the last,
/// which has the counts and no choices), as OpenAI streams it; without it, none does.
#[test]
fn a_stream_with_usage_has_it_on_every_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter(&tmp.path().join("adapter"));
    let server = Server::start(tmp.path(), &adapter);
    let chunks = |usage: bool| -> Vec<serde_json::Value> {
        let body = serde_json::json!({"messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 3, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": usage}});
        let (status, text) = http(
            &server.url,
            "POST",
            "/v1/chat/completions",
            true,
            body.to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("data: [DONE]"), "{text}");
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    };
    let with = chunks(true);
    let (last, before) = with.split_last().unwrap();
    assert!(before.len() >= 2, "{with:?}");
    assert!(before
        .iter()
        .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    assert_eq!(last["choices"], serde_json::json!([]));
    assert!(
        last["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{last}"
    );
    assert!(chunks(false).iter().all(|c| c.get("usage").is_none()));
}

/// A streamed request for thousands of tokens over a raw connection, read until some content
/// has come: the connection and what it has read.
fn long_stream(server: &Server) -> (std::net::TcpStream, String) {
    let addr = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let body = br#"{"messages":[{"role":"user","content":"Count from one to a thousand in words."}],"max_tokens":4000,"stream":true,"temperature":0}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 4 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    (s, seen)
}

/// One raw request with `headers`; the whole response, headers included.
fn raw(url: &str, request_line: &str, headers: &[&str]) -> String {
    let addr = url.trim_start_matches("http://").trim_end_matches("/v1");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("{request_line} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(&format!("{h}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.to_ascii_lowercase()
}

/// A web page on an allowed origin may call the API from a browser: the preflight (which
/// carries no key) is answered, and replies name the origin; another origin is not named, and
/// without --cors-origin nothing is. A bad origin is refused before the model loads.
#[test]
fn browsers_on_an_allowed_origin_may_call_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let ad = adapter(&dir.path().join("adapter"));
    let page = "http://localhost:3000";
    let server = Server::start_with(dir.path(), &ad, KEY, &["--cors-origin", page]);
    let preflight = |origin: &str| {
        raw(
            &server.url,
            "OPTIONS /v1/chat/completions",
            &[
                &format!("Origin: {origin}"),
                "Access-Control-Request-Method: POST",
                // OpenAI's JS SDK adds its own headers to every request.
                "Access-Control-Request-Headers: authorization, content-type, x-stainless-os",
            ],
        )
    };
    let r = preflight(page);
    assert!(r.starts_with("http/1.1 200"), "{r}");
    assert!(
        r.contains(&format!("access-control-allow-origin: {page}")),
        "{r}"
    );
    assert!(
        r.contains("access-control-allow-headers: authorization, content-type, x-stainless-os"),
        "{r}"
    );
    assert!(!preflight("http://evil.example").contains("access-control-allow-origin"));
    let auth = format!("Authorization: Bearer {KEY}");
    let r = raw(
        &server.url,
        "GET /v1/models",
        &[&format!("Origin: {page}"), &auth],
    );
    assert!(
        r.starts_with("http/1.1 200") && r.contains("access-control-allow-origin"),
        "{r}"
    );
    drop(server);
    let plain = Server::start(dir.path(), &ad);
    let r = raw(
        &plain.url,
        "GET /v1/models",
        &[&format!("Origin: {page}"), &auth],
    );
    assert!(
        r.starts_with("http/1.1 200") && !r.contains("access-control"),
        "{r}"
    );
    let o = cli()
        .args([
            "serve",
            "--cors-origin",
            "localhost:3000/app",
            "--model",
            "none",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("--cors-origin localhost:3000/app: not an origin"),
        "{e}"
    );
}
