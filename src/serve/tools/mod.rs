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

use crate::data::tokenizer::Tokenizer;
use crate::infer::prompt::{CallForm, Opening};
use crate::infer::shape::call::CallShape;
use crate::infer::shape::schema::Grammar;
use crate::infer::shape::walk::Walker;
use crate::infer::shape::{check_writable, Shape};
use serde_json::Value;
use std::sync::Arc;

/// The request's functions, and whether a reply may be read as a call to them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// As given, for the template (`{"type": "function", "function": {...}}`).
    pub defs: Vec<Value>,
    pub names: Vec<String>,
    /// Per function, what its arguments are held to: its schema with `strict`, else any
    /// JSON object.
    pub args: Vec<Arc<Grammar>>,
    pub strict: Vec<bool>,
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

    /// What the reply must be: where it calls (or must), a call in the template's `form`, to
    /// one of the functions, with arguments of its grammar. A forced reply goes on from its
    /// `opening`. The error names the function whose `strict` cannot be kept.
    pub fn shape(
        &self,
        form: Option<&CallForm>,
        opening: Option<&Opening>,
    ) -> Result<Shape, String> {
        let functions = |names: &[&str]| {
            let pairs = self.names.iter().zip(&self.args);
            pairs
                .filter(|(n, _)| names.contains(&n.as_str()))
                .map(|(n, g)| (n.clone(), g.clone()))
                .collect()
        };
        if self.choice == Choice::None {
            return Ok(Shape::Free);
        }
        if let (Some(names), Some(form), Some(opening)) = (self.forced(), form, opening) {
            let shape = CallShape::new(&form.start, form, functions(&names), true, &opening.text);
            return Ok(Shape::Call(Arc::new(
                shape.leading(opening.choices.clone()),
            )));
        }
        // A call the reply may make: held once it has written the form's start (a template
        // whose calls start with nothing to tell them from text has none to hold).
        match form.filter(|f| !f.shown.is_empty() && self.forced().is_none()) {
            Some(form) => {
                let all: Vec<&str> = self.names.iter().map(String::as_str).collect();
                let shape = CallShape::new(&form.shown, form, functions(&all), false, "");
                Ok(Shape::Call(Arc::new(shape)))
            }
            None => match self.strict.iter().position(|&s| s) {
                Some(i) => Err(format!(
                    "tools[{i}]: `function.strict`: this model's chat template shows no form \
                     of a call that its arguments could be held in; leave `strict` out or \
                     false"
                )),
                None => Ok(Shape::Free),
            },
        }
    }

    /// Refuses a strict function whose schema this model cannot write (see
    /// [`check_writable`]), naming it.
    pub fn check_writable(&self, tokenizer: &Tokenizer) -> Result<(), String> {
        let strict = self.args.iter().zip(&self.strict).enumerate();
        for (i, (g, _)) in strict.filter(|(_, (_, &s))| s) {
            check_writable(g, tokenizer)
                .map_err(|why| format!("tools[{i}]: `function.parameters`: {why}"))?;
        }
        Ok(())
    }

    /// The calls a reply makes, if it is nothing but calls (if it starts with them, where it
    /// was started as one): its first only where the request asked for no parallel calls.
    /// A call to a strict function whose arguments break its schema (written in a form the
    /// reply was not held in) is no call.
    pub fn read(&self, text: &str) -> Option<Vec<Call>> {
        let mut calls = reply::leading(text, &self.names, self.forced().is_none())?;
        if !self.parallel {
            calls.truncate(1);
        }
        let kept = calls.iter().take_while(|c| self.keeps_to_schema(c)).count();
        match kept {
            0 => None,
            n if n < calls.len() && self.forced().is_none() => None,
            n => {
                calls.truncate(n);
                Some(calls)
            }
        }
    }

    /// Whether `call`'s arguments are a document of its function's schema, where it is strict.
    fn keeps_to_schema(&self, call: &Call) -> bool {
        let Some(f) = self.names.iter().position(|n| *n == call.name) else {
            return false;
        };
        if !self.strict[f] {
            return true;
        }
        let mut w = Walker::new(&self.args[f]);
        w.push_str(&call.arguments) && w.is_complete()
    }

    /// Whether a reply's text so far is all it will be: under a forced choice, once its calls
    /// are made; where the model chooses and only one call is wanted, once it has made one.
    pub fn reply_over(&self, text: &str) -> bool {
        match self.forced() {
            // Started as a call (`text`, its opening included): once it has made its calls.
            Some(_) => reply::calls_over(text, &self.names, self.parallel),
            None => !self.parallel && self.calls() && self.read(text).is_some(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools(choice: Value, strict: bool) -> Tools {
        let f = json!({"name": "f", "strict": strict,
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}});
        let req = json!({"tools": [{"type": "function", "function": f}], "tool_choice": choice});
        from_request(req.as_object().unwrap()).unwrap().unwrap()
    }

    /// A call is held where the reply may call in a form it can be told by; `strict` is
    /// refused where it cannot be.
    #[test]
    fn the_shape_of_a_reply_with_tools() {
        let form = CallForm {
            start: "[TOOL_CALLS] [{\"name\": \"".into(),
            shown: "[{\"name\": \"".into(),
            mid: "\", \"arguments\": ".into(),
            close: "}]".into(),
        };
        let calls = |s: Shape, text: &str| match s {
            Shape::Call(c) => c.walker().is_some_and(|mut w| w.push_str(text)),
            s => panic!("{s:?}"),
        };
        let auto = tools(json!("auto"), true).shape(Some(&form), None).unwrap();
        assert!(calls(
            auto.clone(),
            "[{\"name\": \"f\", \"arguments\": {\"a\": 1"
        ));
        assert!(!calls(
            auto.clone(),
            "[{\"name\": \"f\", \"arguments\": {\"b\""
        ));
        assert!(calls(auto, "Hello"));
        // Not strict: any object.
        let lax = tools(json!("auto"), false)
            .shape(Some(&form), None)
            .unwrap();
        assert!(calls(
            lax,
            "[{\"name\": \"f\", \"arguments\": {\"b\": [true"
        ));
        // Forced: from the opening the prompt ends with, nothing but the call.
        let opening = Opening {
            text: "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": ".into(),
            choices: vec![],
        };
        let forced = tools(json!("required"), true);
        let forced = forced.shape(Some(&form), Some(&opening)).unwrap();
        assert!(calls(forced.clone(), "{\"a\": -2}"));
        assert!(!calls(forced, "Hello"));
        // Under "none", text; without a form, free unless strict.
        let none = tools(json!("none"), true).shape(Some(&form), None);
        assert_eq!(none, Ok(Shape::Free));
        assert_eq!(
            tools(json!("auto"), false).shape(None, None),
            Ok(Shape::Free)
        );
        let e = tools(json!("auto"), true).shape(None, None).unwrap_err();
        assert!(e.starts_with("tools[0]: `function.strict`"), "{e}");
    }

    /// A strict function's call is read only where its arguments keep to the schema (a reply
    /// may call in a form it was not held in); one call wanted, the reply ends at it.
    #[test]
    fn strict_calls_are_read_only_as_their_schema_allows() {
        let call = |args: &str| {
            format!("<tool_call>{{\"name\": \"f\", \"arguments\": {args}}}</tool_call>")
        };
        let (good, bad) = (call(r#"{"a": 1}"#), call(r#"{"a": "x"}"#));
        // A key given twice: the last is read.
        let twice =
            r#"<tool_call>{"name": "f", "arguments": {"a": 1}, "arguments": {"b": 2}}</tool_call>"#;
        for choice in [json!("auto"), json!("required")] {
            let strict = tools(choice.clone(), true);
            assert!(strict.read(&good).is_some(), "{choice}");
            assert_eq!(strict.read(&bad), None, "{choice}");
            assert_eq!(strict.read(twice), None, "{choice}");
            assert!(
                tools(choice.clone(), false).read(&bad).is_some(),
                "{choice}"
            );
            // Forced, the calls it opens with, up to one that breaks its schema.
            let two = format!("{good}{bad}");
            let read = strict.read(&two).map(|c| c.len());
            assert_eq!(read, (choice == "required").then_some(1), "{choice}");
        }
        let one = json!({"tools": [{"type": "function", "function": {"name": "f"}}],
            "parallel_tool_calls": false});
        let one = from_request(one.as_object().unwrap()).unwrap().unwrap();
        assert!(one.reply_over(&good) && !one.reply_over(&good[..good.len() - 3]));
        assert!(!one.reply_over("It is"));
        assert!(!tools(json!("auto"), false).reply_over(&good));
    }
}
