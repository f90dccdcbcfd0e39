//! A reply held to a function call in its chat template's form: the form's start (Qwen's
//! `<tool_call>\n{"name": "`), one of the request's function names, the text between the name
//! and the arguments (`", "arguments": `), then the arguments as a JSON document of that
//! function's grammar. What follows the arguments (the form's close, further calls) is free.
//!
//! Held from where the reply could only be a call: from its first character where it must
//! call, else from where it has written the form's whole start. Before that, a reply that
//! leaves the form is text, and free.

use super::schema::Grammar;
use super::walk::Walker;
use std::sync::Arc;

/// The functions a call may name, and the form it is written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallShape {
    /// The form's text before the name.
    start: String,
    /// Per function: its name and the form's text up to its arguments.
    heads: Vec<String>,
    /// Per function: what its arguments must be.
    args: Vec<Arc<Grammar>>,
    /// Whether the reply must be a call (a forced `tool_choice`).
    must: bool,
    /// What the reply already holds of the call (a forced call's opening, which the prompt
    /// ends with): read before its first token.
    given: String,
    /// Token sequences the reply starts with one of (a forced call's names and what follows
    /// them, as the model writes them: a token-for-token path it knows, where the text alone
    /// would let it take another spelling).
    pub lead: Vec<Vec<u32>>,
}

impl CallShape {
    /// `functions` pairs each name with its arguments' grammar; `mid` is the form's text
    /// between a name and its arguments.
    pub fn new(
        start: &str,
        mid: &str,
        functions: Vec<(String, Arc<Grammar>)>,
        must: bool,
        given: &str,
    ) -> Self {
        let (heads, args) = functions
            .into_iter()
            .map(|(name, grammar)| (format!("{name}{mid}"), grammar))
            .unzip();
        Self {
            start: start.to_string(),
            heads,
            args,
            must,
            given: given.to_string(),
            lead: vec![],
        }
    }

    /// With `lead`: the reply starts with one of these token sequences.
    pub fn leading(self, lead: Vec<Vec<u32>>) -> Self {
        Self { lead, ..self }
    }

    /// Where a reply starts: past what it already holds. None where that is no call's start.
    pub fn walker(&self) -> Option<CallWalker<'_>> {
        let mut w = CallWalker {
            shape: self,
            at: At::Start(0),
        };
        w.push_str(&self.given).then_some(w)
    }
}

/// How far a reply has come through a [`CallShape`].
#[derive(Debug, Clone, Copy)]
pub struct CallWalker<'a> {
    shape: &'a CallShape,
    at: At<'a>,
}

// Copied for each token tried: boxing the walker would allocate per copy.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy)]
enum At<'a> {
    /// This many bytes of the form's start are written.
    Start(usize),
    /// This many bytes of function `f`'s head (and of any other's that begins alike).
    Head { f: usize, n: usize },
    /// In a function's arguments.
    Args(Walker<'a>),
    /// Past the arguments, or a reply that is text: anything.
    Free,
}

impl<'a> CallWalker<'a> {
    /// Whether anything may follow.
    pub fn is_free(&self) -> bool {
        matches!(self.at, At::Free)
    }

    /// Whether a token without text (a special token: an end, a control marker) may come
    /// next: where the reply is still free to be text and it has not begun the call.
    pub fn takes_textless(&self) -> bool {
        match self.at {
            At::Start(_) => !self.shape.must,
            At::Free => true,
            _ => false,
        }
    }

    /// In a string of the arguments, where any text without `"`, `\\` or a control
    /// character leaves the state as it is.
    pub fn in_plain_string(&self) -> bool {
        matches!(self.at, At::Args(json) if json.in_plain_string())
    }

    /// Takes `text`; false (and `self` is then unspecified) where it breaks the call.
    pub fn push_str(&mut self, text: &str) -> bool {
        text.chars().all(|c| self.push(c))
    }

    /// Takes one character; false where it breaks the call.
    pub fn push(&mut self, c: char) -> bool {
        let s = self.shape;
        match &mut self.at {
            At::Free => true,
            // Blanks before the call: a reply read for calls is read trimmed.
            At::Start(0) if c.is_whitespace() && !s.must => true,
            At::Start(k) => {
                if s.start[*k..].starts_with(c) {
                    *k += c.len_utf8();
                    if *k == s.start.len() {
                        self.at = At::Head { f: 0, n: 0 };
                    }
                    true
                } else {
                    // Not the form: text, where the reply may be.
                    self.at = At::Free;
                    !s.must
                }
            }
            At::Head { f, n } => {
                let (f, n) = (*f, *n);
                let written = &s.heads[f][..n];
                let Some(g) = s
                    .heads
                    .iter()
                    .position(|h| h.starts_with(written) && h[n..].starts_with(c))
                else {
                    return false;
                };
                let n = n + c.len_utf8();
                self.at = if n == s.heads[g].len() {
                    At::Args(Walker::new(&s.args[g]))
                } else {
                    At::Head { f: g, n }
                };
                true
            }
            At::Args(json) => {
                if !json.push(c) {
                    return false;
                }
                if json.is_complete() {
                    self.at = At::Free;
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(must: bool, given: &str) -> CallShape {
        let unit = Grammar::from_schema(&json!({"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": false}))
        .unwrap();
        CallShape::new(
            "<tool_call>\n{\"name\": \"",
            "\", \"arguments\": ",
            vec![
                ("get_weather".into(), Arc::new(unit)),
                ("get_time".into(), Arc::new(Grammar::any_object())),
            ],
            must,
            given,
        )
    }

    fn takes(s: &CallShape, text: &str) -> Option<bool> {
        let mut w = s.walker()?;
        w.push_str(text).then(|| w.is_free())
    }

    /// A call is held from its form's start to its arguments' end, each function to its own
    /// grammar; text that leaves the form before that is free, unless the reply must call.
    #[test]
    fn a_call_is_held_to_its_function_s_schema() {
        let auto = shape(false, "");
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                    {\"city\": \"Oslo\", \"unit\": \"c\"}";
        for (i, _) in call.char_indices() {
            assert_eq!(takes(&auto, &call[..i]), Some(false), "{:?}", &call[..i]);
        }
        // Whole: free from there (the form's close, more calls).
        assert_eq!(takes(&auto, &format!("{call}}}\n</tool_call>")), Some(true));
        assert_eq!(takes(&auto, &format!("\n {call}")), Some(true));
        assert_eq!(takes(&auto, &format!("\n {}", &call[..20])), Some(false));
        let time = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": 1}}";
        assert_eq!(takes(&auto, time), Some(true));
        for broken in [
            // Another function, another's arguments, arguments the schema has not.
            "<tool_call>\n{\"name\": \"get_w\"",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"tz\"",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"O\"}",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"O\", \"unit\": \"k",
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": [",
            "<tool_call>\n{\"name\": \"get_time\"}",
        ] {
            assert_eq!(takes(&auto, broken), None, "{broken}");
        }
        // Text, or a start left before its end: free.
        for text in [
            "It is sunny.",
            "<tool_cal",
            "<tool_x",
            "<tool_call>\n{\"nam\"",
            "",
        ] {
            let free = !text.is_empty() && text != "<tool_cal";
            assert_eq!(takes(&auto, text), Some(free), "{text}");
        }
        // Made to call: nothing else.
        let must = shape(true, "");
        assert_eq!(takes(&must, "It is"), None);
        assert_eq!(takes(&must, " <tool_call>"), None);
        assert_eq!(takes(&must, call), Some(true));
        // Its opening given in the prompt: the reply goes on from it.
        let given = shape(true, "<tool_call>\n{\"name\": \"get_");
        assert_eq!(
            takes(&given, "weather\", \"arguments\": {\"city\": \"\""),
            Some(false)
        );
        assert_eq!(takes(&given, "date\""), None);
        assert!(shape(true, "<x>").walker().is_none());
    }

    #[test]
    fn textless_tokens_only_where_the_reply_may_be_text() {
        let auto = shape(false, "");
        let mut w = auto.walker().unwrap();
        assert!(w.takes_textless());
        assert!(w.push_str("<tool_call>\n{\"name\": \"get_time\""));
        assert!(!w.takes_textless());
        assert!(w.push_str(", \"arguments\": {\"a\": \"b"));
        assert!(!w.takes_textless() && w.in_plain_string());
        assert!(w.push_str("\"}"));
        assert!(w.takes_textless() && w.is_free());
        assert!(!shape(true, "").walker().unwrap().takes_textless());
    }
}
