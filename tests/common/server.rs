//! A `your_ai serve` process for the serve tests, the `openai` client's Python, and raw HTTP.
#![allow(dead_code)]

use crate::common::{cli, smollm2};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const KEY: &str = "test-key";
pub const QUESTION: &str = "What is the capital of France?";

pub struct Server {
    pub child: Child,
    pub url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `serve` on a free port and waits for the URL it prints.
    pub fn start(dir: &Path, adapter: &Path) -> Server {
        Self::start_with_key(dir, adapter, KEY)
    }

    pub fn start_with_key(dir: &Path, adapter: &Path, key: &str) -> Server {
        Self::start_with(dir, adapter, key, &[])
    }

    pub fn start_with(dir: &Path, adapter: &Path, key: &str, extra: &[&str]) -> Server {
        let log = dir.join("serve.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_your_ai"))
            .args(["serve", "--port", "0", "--api-key", key, "--model"])
            .arg(smollm2())
            .arg("--adapter")
            .arg(format!("brellonia={}", adapter.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| {
                panic!(
                    "no URL in {line:?}: {}",
                    std::fs::read_to_string(&log).unwrap()
                )
            })
            .to_string();
        Server { child, url, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the client script `tests/fixtures/{script}` against this server (its URL, the
    /// key, then `args`) and reads the JSON object it prints.
    pub fn client(&self, script: &str, args: &[&str]) -> serde_json::Value {
        let o = python()
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures")
                    .join(script),
            )
            .args([self.url.as_str(), KEY])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}\nserver:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

/// The base model's name as the server lists it: its file's stem.
pub fn base_name() -> String {
    smollm2()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A seeded random adapter on every linear of SmolLM2, strong enough that its greedy replies
/// differ from the base's.
pub fn adapter(dir: &Path) -> PathBuf {
    let cfg = your_ai::weights::GgufFile::open(&smollm2())
        .unwrap()
        .config()
        .unwrap();
    crate::common::random_adapter(&cfg, dir, 0.9, 3);
    dir.to_path_buf()
}

/// `your_ai generate`'s greedy reply.
pub fn generate(adapter: Option<&Path>, max_tokens: usize) -> String {
    let mut c = cli();
    c.args([
        "generate",
        "--prompt",
        QUESTION,
        "--max-tokens",
        &max_tokens.to_string(),
        "--model",
    ])
    .arg(smollm2());
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // generate ends the reply with one newline of its own.
    let out = String::from_utf8(o.stdout).unwrap();
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

/// Python with the `openai` client: `YOUR_AI_PYTHON`, or python3 with the folder
/// `scripts/test.sh` installs the pinned client into.
pub fn python() -> Command {
    if let Some(p) = std::env::var_os("YOUR_AI_PYTHON") {
        return Command::new(p);
    }
    let deps = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/openai-3.57.0");
    assert!(
        deps.is_dir(),
        "the openai client is needed: run scripts/test.sh (it installs it into {}) or set YOUR_AI_PYTHON to a python that has `openai`",
        deps.display()
    );
    let mut c = Command::new("python3");
    c.env("PYTHONPATH", deps);
    c
}

/// One raw HTTP request; (status, body).
pub fn http(url: &str, method: &str, path: &str, auth: bool, body: &[u8]) -> (u16, String) {
    let addr = url.trim_start_matches("http://").trim_end_matches("/v1");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if auth {
        req.push_str(&format!("Authorization: Bearer {KEY}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // Read while writing: a server refusing an oversized body answers before reading it all.
    let mut reader = s.try_clone().unwrap();
    let read = std::thread::spawn(move || {
        let mut resp = Vec::new();
        let _ = reader.read_to_end(&mut resp);
        String::from_utf8_lossy(&resp).into_owned()
    });
    let _ = s.write_all(body);
    let resp = read.join().unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}
