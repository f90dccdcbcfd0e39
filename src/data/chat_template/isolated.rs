//! Chat-template renders in a child process with a memory ceiling.
//!
//! The engine's fuel bounds how many instructions a template runs, and our filters cap the
//! widths it may ask for, but one instruction can still double a string or a list
//! (`{% set ns.s = ns.s ~ ns.s %}` in a loop of 40): the allocation fails or the machine
//! swaps, and a failed allocation aborts the whole process, which no `catch_unwind` can stop.
//! So the command-line tool renders in a child of itself (`your_ai __chat-template-worker`)
//! whose address space is limited: a runaway template kills only that child, the caller gets
//! an error naming the cause, and the next render starts a fresh child. Renders are one JSON
//! line each way over pipes (tens of microseconds); the child lives as long as the template.

use super::{ChatTemplate, TemplateError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

/// The hidden subcommand that runs the worker; `main` checks for it before parsing flags.
pub const WORKER_ARG: &str = "__chat-template-worker";
/// Memory one render may use beyond the worker's own footprint.
pub const MEMORY_CAP: u64 = 2 << 30;
/// Wall time one render may take. The fuel stops a loop within about a second; this stops
/// the few instructions that each copy a huge value.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(30);

static WORKER_EXE: OnceLock<PathBuf> = OnceLock::new();

/// Renders every template made from now on in worker processes started from `exe` (the
/// `your_ai` binary itself). Without it (a library user, a unit test) renders run in-process.
pub fn enable(exe: PathBuf) {
    let _ = WORKER_EXE.set(exe);
}

pub(super) fn worker_exe() -> Option<&'static Path> {
    WORKER_EXE.get().map(PathBuf::as_path)
}

#[derive(Serialize)]
struct Request<'a> {
    vars: &'a Map<String, Json>,
    limit: usize,
}

#[derive(Deserialize)]
struct OwnedRequest {
    vars: Map<String, Json>,
    limit: usize,
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Ok(String),
    Raised(String),
    Render(String),
    Syntax(String),
}

impl From<Result<String, TemplateError>> for Reply {
    fn from(r: Result<String, TemplateError>) -> Self {
        match r {
            Ok(s) => Reply::Ok(s),
            Err(TemplateError::Raised(m)) => Reply::Raised(m),
            Err(TemplateError::Syntax(m)) => Reply::Syntax(m),
            // Not errors of a render: a worker never sends them back.
            Err(
                e @ (TemplateError::Missing
                | TemplateError::NoPlaceForTools
                | TemplateError::HidesToolHistory(_)
                | TemplateError::NoCallForm
                | TemplateError::FailsOnTools(_)
                | TemplateError::DropsMessage(_)
                | TemplateError::OfModel { .. }),
            ) => Reply::Render(e.to_string()),
            Err(TemplateError::Render(m)) => Reply::Render(m),
        }
    }
}

impl From<Reply> for Result<String, TemplateError> {
    fn from(r: Reply) -> Self {
        match r {
            Reply::Ok(s) => Ok(s),
            Reply::Raised(m) => Err(TemplateError::Raised(m)),
            Reply::Render(m) => Err(TemplateError::Render(m)),
            Reply::Syntax(m) => Err(TemplateError::Syntax(m)),
        }
    }
}

/// A template's worker process, started on first render and again after one dies.
pub(super) struct Isolated {
    exe: PathBuf,
    source: String,
    running: Option<Running>,
    /// The worker could not be started once: do not try (and warn) again.
    unavailable: bool,
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    /// Lines from the child's stdout, read on a thread so a render can time out.
    lines: mpsc::Receiver<std::io::Result<String>>,
    stderr: ChildStderr,
}

impl Isolated {
    pub(super) fn new(exe: &Path, source: &str) -> Self {
        Self {
            exe: exe.to_path_buf(),
            source: source.to_string(),
            running: None,
            unavailable: false,
        }
    }

    /// Starts the worker unless it runs; false (with a warning) when it cannot be started,
    /// for example because the binary was replaced while running: renders then stay in-process.
    pub(super) fn available(&mut self) -> bool {
        if self.unavailable {
            return false;
        }
        if self.running.is_none() {
            match self.start() {
                Ok(r) => self.running = Some(r),
                Err(e) => {
                    tracing::warn!(
                        "{e}; rendering chat templates in-process, without the memory ceiling"
                    );
                    return false;
                }
            }
        }
        true
    }

    pub(super) fn render(
        &mut self,
        vars: &Map<String, Json>,
        limit: usize,
    ) -> Result<String, TemplateError> {
        let mut running = match self.running.take() {
            Some(r) => r,
            None => self.start()?,
        };
        let mut line = serde_json::to_string(&Request { vars, limit })
            .map_err(|e| TemplateError::Render(format!("the conversation is not JSON: {e}")))?;
        line.push('\n');
        if running.stdin.write_all(line.as_bytes()).is_err() || running.stdin.flush().is_err() {
            return Err(running.died());
        }
        match running.lines.recv_timeout(RENDER_TIMEOUT) {
            Ok(Ok(reply)) => {
                let reply: Reply = serde_json::from_str(&reply).map_err(|e| {
                    TemplateError::Render(format!("the template worker replied nonsense: {e}"))
                })?;
                self.running = Some(running);
                reply.into()
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                Err(TemplateError::Render(format!(
                    "rendering one conversation took more than {} s (a runaway template?); it was stopped",
                    RENDER_TIMEOUT.as_secs()
                )))
            }
            Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => Err(running.died()),
        }
    }

    fn start(&self) -> Result<Running, TemplateError> {
        let cannot = |e: std::io::Error| {
            TemplateError::Render(format!(
                "cannot start the template worker {}: {e}",
                self.exe.display()
            ))
        };
        let mut child = Command::new(&self.exe)
            .arg(WORKER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(cannot)?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(cannot(std::io::Error::other("no pipes")));
        };
        let mut first = serde_json::to_string(&self.source).map_err(|e| cannot(e.into()))?;
        first.push('\n');
        stdin.write_all(first.as_bytes()).map_err(cannot)?;
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("chat-template-reader".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(cannot)?;
        Ok(Running {
            child,
            stdin,
            lines,
            stderr,
        })
    }
}

impl Running {
    /// The worker is gone: reap it and say why.
    fn died(mut self) -> TemplateError {
        let _ = self.child.kill();
        let status = self.child.wait();
        let mut said = String::new();
        let _ = (&mut self.stderr).take(64 << 10).read_to_string(&mut said);
        if said.contains("memory allocation of") {
            return TemplateError::Render(format!(
                "rendering one conversation needed more than {} GiB of memory (a runaway \
                 template that keeps doubling a string or list?); it was stopped",
                MEMORY_CAP >> 30
            ));
        }
        let how = match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        TemplateError::Render(format!(
            "the template worker process died ({how}) while rendering one conversation{}",
            match said.trim() {
                "" => String::new(),
                s => format!(": {}", s.lines().last().unwrap_or(s)),
            }
        ))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The worker's side: reads the template source, then one request a line, and replies one
/// line each. Returns the exit code.
pub fn serve() -> i32 {
    // The parent decides what a Ctrl-C means; panics are caught and replied as errors.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    std::panic::set_hook(Box::new(|_| {}));
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let Some(Ok(first)) = lines.next() else {
        return 2;
    };
    let Ok(source) = serde_json::from_str::<String>(&first) else {
        return 2;
    };
    let template = ChatTemplate::in_process(&source);
    limit_memory();
    let mut out = std::io::stdout().lock();
    for line in lines {
        let Ok(line) = line else { return 2 };
        let reply: Reply = match (&template, serde_json::from_str::<OwnedRequest>(&line)) {
            (Ok(t), Ok(req)) => t.render_vars(req.vars, req.limit).into(),
            (Err(e), _) => Reply::Syntax(e.to_string()),
            (_, Err(e)) => Reply::Render(format!("a bad request to the template worker: {e}")),
        };
        let Ok(mut text) = serde_json::to_string(&reply) else {
            return 2;
        };
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() || out.flush().is_err() {
            return 0;
        }
    }
    0
}

/// Caps the worker's address space at what it uses now, plus the render thread's reserved
/// stack and a malloc arena, plus [`MEMORY_CAP`]; past it an allocation fails and the worker
/// aborts. Linux only: elsewhere the worker still shields the caller, without the ceiling.
fn limit_memory() {
    #[cfg(target_os = "linux")]
    {
        let Some(now) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        else {
            return;
        };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let cap = now * page + super::RENDER_STACK as u64 + (256 << 20) + MEMORY_CAP;
        let lim = libc::rlimit {
            rlim_cur: cap as libc::rlim_t,
            rlim_max: cap as libc::rlim_t,
        };
        // SAFETY: a valid rlimit for this process.
        unsafe {
            libc::setrlimit(libc::RLIMIT_AS, &lim);
        }
    }
}
