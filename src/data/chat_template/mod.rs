//! Chat templates rendered the way Hugging Face transformers renders them: Jinja with
//! `trim_blocks` and `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that writes JSON exactly as Python's `json.dumps` does
//! (non-ASCII kept, `", "` / `": "` separators, Python float spelling).

use minijinja::value::{Kwargs, Rest, StringInput};
use minijinja::{Environment, ErrorKind, State, Value};
use serde_json::{Map, Value as Json};
use std::sync::{mpsc, Arc, Mutex};

mod isolated;
mod tojson;
pub use isolated::{enable as isolate_renders, serve as serve_worker, WORKER_ARG};

// A chat template comes with a downloaded model and is code we run: it must not be able to
// hang or exhaust memory. These bounds are far above what real templates need.

/// Instructions one render may execute (a real template needs tens per message); a runaway
/// loop stops here, within about a second, instead of hanging.
pub const FUEL: u64 = 2_000_000;
/// Stack of the thread renders run on. Values nested as deep as the fuel allows (about
/// 300,000 levels, `{% set ns.x = [ns.x] %}` in a loop) are printed and dropped recursively by
/// the engine; on an ordinary stack that overflows and aborts the process. Reserved, not
/// committed: a normal render touches a few pages of it.
const RENDER_STACK: usize = 1 << 30;
/// Largest width or count accepted by the padding, indenting and slicing filters and by
/// format specifiers: minijinja allocates them up front, without a cap of its own.
pub const MAX_WIDTH: usize = 100_000;
/// Deepest value `tojson` writes (it recurses; a template can build nesting of any depth).
const MAX_JSON_DEPTH: usize = 256;
/// Output one render may produce besides its input's size times [`OUTPUT_PER_INPUT_BYTE`].
const OUTPUT_BASE: usize = 16 << 20;
const OUTPUT_PER_INPUT_BYTE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    #[error("the chat template raised an error: {0}")]
    Raised(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    #[error("this model has no chat template; pass --raw to send the prompt as plain text")]
    Missing,
    /// A model's own template that fails, named with the model and the way round it.
    #[error("{model}'s chat template: {error}{hint}")]
    OfModel {
        model: String,
        error: Box<TemplateError>,
        hint: &'static str,
    },
    #[error(
        "this model's chat template has no place for tools (it renders the same without them), \
         so the model would never see them; serve it with a --chat-template that takes tools, \
         or leave `tools` out"
    )]
    NoPlaceForTools,
    /// What of the tool history the template leaves out: `tool_calls`, or `tool` messages.
    #[error(
        "this model's chat template does not show {0} (it renders the same \
         without them), so the model would never see them; serve it with a --chat-template \
         that takes tools, or leave them out"
    )]
    HidesToolHistory(&'static str),
    #[error(
        "this model's chat template does not write a call after the prompt in a form this \
         server can start, so a call cannot be forced; give tool_choice \"auto\""
    )]
    NoCallForm,
    /// The template renders the conversation, and fails on the tools given.
    #[error(
        "the chat template fails on the tools given ({0}); give each tool what the template \
         reads of it (a description, parameters)"
    )]
    FailsOnTools(String),
    /// A user message whose text the rendered prompt does not hold (by its index).
    #[error(
        "the chat template leaves out message {0} (a user turn): its text is not in the prompt \
         it renders, so the model would reply without it; use a template that shows every \
         message (--chat-template FILE), or --raw"
    )]
    DropsMessage(usize),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// The render thread (see [`RENDER_STACK`]), started on first use and kept: a thread per
    /// render cost 5-10 times the render itself. It ends when the template is dropped.
    worker: Mutex<Option<mpsc::Sender<Job>>>,
    /// Where renders run instead when the tool isolates them (see [`isolated`]).
    isolated: Option<Mutex<isolated::Isolated>>,
}

/// The template's variables, the output cap, and where the result goes.
type Job = (
    Map<String, Json>,
    usize,
    mpsc::Sender<Result<String, TemplateError>>,
);

/// What a template sees, as transformers passes it.
impl TemplateError {
    /// This error named as `model`'s template, with `hint` (how to do without it) after it;
    /// errors that are not the template's own failing are left as they are.
    pub fn of_model(self, model: &str, hint: &'static str) -> Self {
        match self {
            TemplateError::Syntax(_) | TemplateError::Raised(_) | TemplateError::Render(_) => {
                TemplateError::OfModel {
                    model: model.to_string(),
                    error: Box::new(self),
                    hint,
                }
            }
            e => e,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ChatContext<'a> {
    pub messages: &'a [Json],
    pub tools: Option<&'a [Json]>,
    pub add_generation_prompt: bool,
    pub bos_token: Option<&'a str>,
    pub eos_token: Option<&'a str>,
    /// Further variables (for example `date_string`).
    pub extra: Map<String, Json>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles a template; it renders in a worker process when [`isolate_renders`] was
    /// called (the command-line tool does), otherwise in this process.
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut t = Self::in_process(source)?;
        t.isolated =
            isolated::worker_exe().map(|exe| Mutex::new(isolated::Isolated::new(exe, source)));
        Ok(t)
    }

    /// A template that renders in worker processes started from `exe` (the `your_ai` binary).
    pub fn isolated(source: &str, exe: &std::path::Path) -> Result<Self, TemplateError> {
        let mut t = Self::in_process(source)?;
        t.isolated = Some(Mutex::new(isolated::Isolated::new(exe, source)));
        Ok(t)
    }

    fn in_process(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(|state, value, method, args| {
            if method == "format" {
                if let Some(s) = value.as_str() {
                    check_format_widths(s)?;
                }
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        env.add_filter(
            "indent",
            |value: StringInput,
             width: Option<usize>,
             first: Option<bool>,
             blank: Option<bool>,
             kwargs: Kwargs| {
                let w = match width {
                    Some(w) => Some(w),
                    None => kwargs.peek::<Option<usize>>("width")?,
                };
                check_width("indent", w.unwrap_or(0))?;
                minijinja::filters::indent(value, width, first, blank, kwargs)
            },
        );
        env.add_filter(
            "slice",
            |state: &State, value: Value, count: usize, fill: Option<Value>| {
                check_width("slice", count)?;
                minijinja::filters::slice(state, value, count, fill)
            },
        );
        env.add_filter(
            "batch",
            |state: &State, value: Value, count: usize, fill: Option<Value>| {
                check_width("batch", count)?;
                minijinja::filters::batch(state, value, count, fill)
            },
        );
        env.add_filter(
            "format",
            |state: &State, format: &Value, args: Rest<Value>| {
                if let Some(s) = format.as_str() {
                    check_format_widths(s)?;
                }
                minijinja::filters::format(state, format, args)
            },
        );
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("RAISED:{msg}"),
                ))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson::tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self {
            env: Arc::new(env),
            worker: Mutex::new(None),
            isolated: None,
        })
    }

    pub fn render(&self, ctx: &ChatContext) -> Result<String, TemplateError> {
        let (vars, limit) = variables(ctx);
        if let Some(iso) = &self.isolated {
            let mut iso = iso.lock().unwrap_or_else(|p| p.into_inner());
            if iso.available() {
                return iso.render(&vars, limit);
            }
        }
        self.render_vars(vars, limit)
    }

    /// Renders on this process's render thread.
    fn render_vars(&self, vars: Map<String, Json>, limit: usize) -> Result<String, TemplateError> {
        let mut worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            *worker = self.start_worker();
        }
        let (reply, result) = mpsc::channel();
        let job = match worker.as_ref() {
            Some(tx) => match tx.send((vars, limit, reply)) {
                Ok(()) => {
                    return result.recv().unwrap_or_else(|_| {
                        // The thread is gone (it should not be: panics are caught); the
                        // next render starts a new one.
                        *worker = None;
                        Err(TemplateError::Render(
                            "the template engine's thread ended during the render".into(),
                        ))
                    });
                }
                Err(mpsc::SendError(job)) => {
                    *worker = None;
                    job
                }
            },
            None => (vars, limit, reply),
        };
        // No thread to be had (address space, limits): render here, on the caller's stack.
        render_now(&self.env, job.0, job.1)
    }

    fn start_worker(&self) -> Option<mpsc::Sender<Job>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let env = Arc::clone(&self.env);
        std::thread::Builder::new()
            .name("chat-template".into())
            .stack_size(RENDER_STACK)
            .spawn(move || {
                while let Ok((vars, limit, reply)) = rx.recv() {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        render_now(&env, vars, limit)
                    }))
                    .unwrap_or_else(|panic| {
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Err(TemplateError::Render(format!(
                            "the template engine failed on this template: {why}"
                        )))
                    });
                    let _ = reply.send(r);
                }
            })
            .ok()
            .map(|_| tx)
    }
}

/// The variables a template sees, as transformers passes them, and the output cap.
fn variables(ctx: &ChatContext) -> (Map<String, Json>, usize) {
    let mut vars = ctx.extra.clone();
    // As transformers does: message keys holding null are dropped (the template sees them
    // undefined), and `tools` / `documents` are always defined, none when absent.
    let messages = ctx
        .messages
        .iter()
        .map(|m| match m {
            Json::Object(o) => Json::Object(
                o.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            other => other.clone(),
        })
        .collect();
    vars.insert("messages".into(), Json::Array(messages));
    vars.insert(
        "tools".into(),
        ctx.tools
            .map(|t| Json::Array(t.to_vec()))
            .unwrap_or(Json::Null),
    );
    vars.entry("documents").or_insert(Json::Null);
    vars.insert(
        "add_generation_prompt".into(),
        Json::Bool(ctx.add_generation_prompt),
    );
    if let Some(b) = ctx.bos_token {
        vars.insert("bos_token".into(), Json::String(b.into()));
    }
    if let Some(e) = ctx.eos_token {
        vars.insert("eos_token".into(), Json::String(e.into()));
    }
    let input: usize = ctx.messages.iter().map(json_size).sum::<usize>()
        + ctx.tools.map_or(0, |t| t.iter().map(json_size).sum());
    let limit = OUTPUT_BASE.saturating_add(input.saturating_mul(OUTPUT_PER_INPUT_BYTE));
    (vars, limit)
}

fn render_now(
    env: &Environment<'static>,
    vars: Map<String, Json>,
    limit: usize,
) -> Result<String, TemplateError> {
    let tpl = env
        .get_template(TEMPLATE_NAME)
        .map_err(|e| TemplateError::Render(describe(&e)))?;
    let mut out = Capped {
        bytes: Vec::new(),
        limit,
        over: false,
    };
    let rendered = tpl
        .render_captured_to(Value::from_serialize(&vars), &mut out)
        .map(|_| ());
    if out.over {
        return Err(TemplateError::Render(format!(
                "the output passed {limit} bytes ({OUTPUT_PER_INPUT_BYTE} times the conversation's size plus {} MiB); a template that writes this much is runaway",
                OUTPUT_BASE >> 20
            )));
    }
    rendered.map_err(|e| {
        if e.kind() == ErrorKind::OutOfFuel {
            return TemplateError::Render(format!(
                "the template ran {FUEL} instructions without finishing (a runaway loop?)"
            ));
        }
        match raised(&e) {
            Some(msg) => TemplateError::Raised(msg.to_string()),
            None => TemplateError::Render(describe(&e)),
        }
    })?;
    String::from_utf8(out.bytes)
        .map_err(|e| TemplateError::Render(format!("the output is not UTF-8: {e}")))
}

/// The rendered text, refused past `limit` bytes.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.limit {
            self.over = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Roughly the bytes a JSON value holds (strings and keys; numbers and punctuation count 1).
fn json_size(v: &Json) -> usize {
    match v {
        Json::String(s) => s.len() + 2,
        Json::Array(a) => a.iter().map(json_size).sum::<usize>() + 2,
        Json::Object(o) => {
            o.iter()
                .map(|(k, v)| k.len() + 3 + json_size(v))
                .sum::<usize>()
                + 2
        }
        _ => 8,
    }
}

fn check_width(what: &str, n: usize) -> Result<(), minijinja::Error> {
    if n > MAX_WIDTH {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("{what}: {n} is larger than the {MAX_WIDTH} a chat template may ask for"),
        ));
    }
    Ok(())
}

/// Refuses widths and precisions above [`MAX_WIDTH`] in printf-style (`%8.3f`) and Python
/// `str.format` (`{:>8}`) format strings: they are allocated as padding up front.
fn check_format_widths(format: &str) -> Result<(), minijinja::Error> {
    let bytes = format.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let spec_start = match bytes[i] {
            b'%' => i + 1,
            b'{' => match format[i..].find(['}', ':']) {
                Some(j) if bytes[i + j] == b':' => i + j + 1,
                _ => {
                    i += 1;
                    continue;
                }
            },
            _ => {
                i += 1;
                continue;
            }
        };
        // Every run of digits in the specifier (fill, width, precision) up to its end.
        let mut j = spec_start;
        while j < bytes.len() && !bytes[j].is_ascii_alphabetic() && bytes[j] != b'}' {
            if bytes[j].is_ascii_digit() {
                let run = format[j..]
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(format.len() - j);
                let n = format[j..j + run].parse::<usize>().unwrap_or(usize::MAX);
                check_width("format width", n)?;
                j += run;
            } else {
                j += 1;
            }
        }
        i = j.max(i + 1);
    }
    Ok(())
}

/// The message a template gave `raise_exception`, without minijinja's " (in chat:71)": the
/// error or one of its causes carries it as its detail.
fn raised(e: &minijinja::Error) -> Option<&str> {
    let mut err: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(inner) = err {
        let msg = inner
            .downcast_ref::<minijinja::Error>()
            .and_then(|m| m.detail()?.strip_prefix("RAISED:"));
        if msg.is_some() {
            return msg;
        }
        err = inner.source();
    }
    None
}

/// The error and its causes on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// transformers' `{% generation %}` tag only marks assistant text for its own masking; we find
/// assistant spans from rendering offsets instead. The tags become no-op blocks (not nothing)
/// so that `lstrip_blocks`/`trim_blocks` treat the whitespace around them as Jinja does.
fn strip_generation_tags(source: &str) -> String {
    let re = regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("static regex");
    re.replace_all(source, |c: &regex::Captures| {
        let tag = if c.get(2).is_some() {
            "endif"
        } else {
            "if true"
        };
        format!("{{%{} {tag} {}%}}", &c[1], &c[3])
    })
    .into_owned()
}

fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format `{format}`"),
        ));
    }
    Ok(Value::from(
        chrono::Local::now()
            .format_with_items(items.into_iter())
            .to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn raise_exception_surfaces_the_message() {
        // Whole, without minijinja's location: "(in chat:1" was once left at the end.
        for source in [
            "{{ raise_exception('roles must (still) alternate') }}",
            "{% macro m() %}{{ raise_exception('roles must (still) alternate') }}{% endmacro %}\n{{ m() }}",
        ] {
            let e = ChatTemplate::new(source)
                .unwrap()
                .render(&ChatContext::default())
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "the chat template raised an error: roles must (still) alternate"
            );
        }
    }

    #[test]
    fn trim_and_lstrip_blocks_and_generation_tags() {
        let t = ChatTemplate::new("{% for m in messages %}\n  {% generation %}{{ m.content.strip() }}{% endgeneration %}|\n{% endfor %}\n").unwrap();
        let out = t
            .render(&ChatContext {
                messages: &[json!({"content": " a "}), json!({"content": "b"})],
                ..Default::default()
            })
            .unwrap();
        // As Jinja2 renders it with transformers' generation extension.
        assert_eq!(out, "a|\nb|\n");
    }

    #[test]
    fn bad_strftime_format_is_an_error_not_a_panic() {
        let t = ChatTemplate::new("{{ strftime_now('%Q') }}").unwrap();
        assert!(t.render(&ChatContext::default()).is_err());
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}").unwrap();
        assert_eq!(t.render(&ChatContext::default()).unwrap().len(), 11);
    }
}
