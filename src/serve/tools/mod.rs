//! Function calling in OpenAI's form: the request's `tools` go to the model's chat template,
//! earlier calls and their results in `messages` are rendered as the template renders them, and
//! a reply that is a call (in one of the forms chat models write them) comes back as
//! `tool_calls`, with `finish_reason` "tool_calls".
//!
//! Forms read: Hermes and Qwen's `<tool_call>{...}</tool_call>` (one or more), Mistral's
//! `[TOOL_CALLS] [{...}]`, and a bare JSON object or array of them (Llama 3.1's form), each
//! `{"name", "arguments" | "parameters"}`. A call is only one to a function the request
//! named; anything else is the reply's text.

mod reply;
mod request;

pub use reply::{could_be_call, parse, to_json};
pub use request::{check_answers, from_request, history_calls, refuse_on_completions};

use serde_json::Value;

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

    /// Whether the reply is started as a call, and the functions it may call: the one named,
    /// or under "required" any of them, the model choosing.
    pub fn forced(&self) -> Option<Vec<&str>> {
        match &self.choice {
            Choice::Required => Some(self.names.iter().map(String::as_str).collect()),
            Choice::Named(n) => Some(vec![n]),
            Choice::Auto | Choice::None => None,
        }
    }

    /// Whether a reply started as a call (`text`, its opening included) has made every call
    /// it will: its generation stops there.
    pub fn calls_over(&self, text: &str) -> bool {
        reply::calls_over(text, &self.names, self.parallel)
    }

    /// The calls a reply makes, if it is nothing but calls (if it starts with them, where it
    /// was started as one): its first only where the request asked for no parallel calls.
    pub fn read(&self, text: &str) -> Option<Vec<Call>> {
        let mut calls = reply::leading(text, &self.names, self.forced().is_none())?;
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
