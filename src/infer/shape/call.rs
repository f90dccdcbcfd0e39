//! A reply held to a function call in its chat template's form: the form's start (Qwen's
//! `<tool_call>\n{"name": "`), one of the request's function names, the text between the name
//! and the arguments (`", "arguments": `), the arguments as a JSON document of that function's
//! grammar, and the form's close (`}\n</tool_call>`). What follows (more calls, the end) is
//! free.
//!
//! Held from where the reply could only be a call: from its first character where it must
//! call, else from where it has written the form's start and a function's name. Before that,
//! a reply that leaves the form is text, and free.

use super::schema::Grammar;
use super::walk::Walker;
use std::sync::Arc;

/// How a chat template writes a call: `start`, the function's name, `mid`, the arguments,
/// `close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallForm {
    /// As rendered (Mistral's `[TOOL_CALLS] [{"name": "`).
    pub start: String,
    /// As a reply's text shows it, control tokens dropped and leading blanks trimmed
    /// (`[{"name": "`).
    pub shown: String,
    pub mid: String,
    /// From the arguments' end to the call's (`}]`), before the turn's end.
    pub close: String,
}

/// The functions a call may name, and the form it is written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallShape {
    /// The form's text before the name.
    start: String,
    /// Per function: its name and the form's text up to its arguments.
    heads: Vec<String>,
    /// Per function: what its arguments must be.
    args: Vec<Arc<Grammar>>,
    close: String,
    /// Whether the reply must be a call (a forced `tool_choice`).
    must: bool,
    /// What the reply already holds of the call (a forced call's opening, which the prompt
    /// ends with): read before its first token.
    given: String,
    /// Per function, the tokens the reply starts with, one function's (a forced call's names
    /// and what follows them, as the model writes them: a token-for-token path it knows,
    /// where the text alone would let it take another spelling). Empty: none.
    pub lead: Vec<Vec<u32>>,
}

impl CallShape {
    /// A call in `form`, opening with `start` (the form's `start` as rendered, or as
    /// `shown`); `functions` pairs each name with its arguments' grammar.
    pub fn new(
        start: &str,
        form: &CallForm,
        functions: Vec<(String, Arc<Grammar>)>,
        must: bool,
        given: &str,
    ) -> Self {
        let (heads, args) = functions
            .into_iter()
            .map(|(name, grammar)| (format!("{name}{}", form.mid), grammar))
            .unzip();
        Self {
            start: start.to_string(),
            heads,
            args,
            close: form.close.clone(),
            must,
            given: given.to_string(),
            lead: vec![],
        }
    }

    /// With `lead`, one token sequence per function, in their order: the reply starts with
    /// one of them.
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
    /// This many bytes of the close are written.
    Close(usize),
    /// Past the call, or a reply that is text: anything.
    Free,
}

impl<'a> CallWalker<'a> {
    /// Whether anything may follow.
    pub fn is_free(&self) -> bool {
        matches!(self.at, At::Free)
    }

    /// Where function `f`'s arguments begin: the reply has written its lead.
    pub fn at_arguments(&mut self, f: usize) {
        self.at = At::Args(Walker::new(&self.shape.args[f]));
    }

    /// Whether a token without text (a special token: an end, a control marker) may come
    /// next: where the reply may still be text.
    pub fn takes_textless(&self) -> bool {
        match self.at {
            At::Start(_) | At::Head { .. } => !self.shape.must,
            At::Free => true,
            At::Args(_) | At::Close(_) => false,
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
        match self.at {
            At::Free => true,
            // Blanks before the call: a reply read for calls is read trimmed.
            At::Start(0) if c.is_whitespace() && !s.must => true,
            At::Start(k) if s.start[k..].starts_with(c) => {
                self.at = match k + c.len_utf8() {
                    k if k == s.start.len() => self.head(0, 0),
                    k => At::Start(k),
                };
                true
            }
            At::Head { f, n } => {
                let written = &s.heads[f][..n];
                let goes_on = |h: &String| h.starts_with(written) && h[n..].starts_with(c);
                if let Some(g) = s.heads.iter().position(goes_on) {
                    self.at = self.head(g, n + c.len_utf8());
                    return true;
                }
                // A name that is another's beginning, where the form puts nothing between
                // name and arguments: this character is the arguments'.
                match s.heads.iter().position(|h| h == written) {
                    Some(g) => {
                        self.at_arguments(g);
                        self.push(c)
                    }
                    None => self.leave(),
                }
            }
            At::Args(mut json) => {
                if !json.push(c) {
                    return false;
                }
                self.at = match json.is_complete() {
                    true if s.close.is_empty() => At::Free,
                    true => At::Close(0),
                    false => At::Args(json),
                };
                true
            }
            At::Close(k) if s.close[k..].starts_with(c) => {
                self.at = match k + c.len_utf8() {
                    k if k == s.close.len() => At::Free,
                    k => At::Close(k),
                };
                true
            }
            At::Start(_) => self.leave(),
            At::Close(_) => false,
        }
    }

    /// Where `n` bytes of function `f`'s head are written: its arguments once it is whole
    /// and no other name goes on from it.
    fn head(&self, f: usize, n: usize) -> At<'a> {
        let heads = &self.shape.heads;
        let longer = heads
            .iter()
            .any(|h| h.len() > n && h.starts_with(&heads[f][..n]));
        match n == heads[f].len() && !longer {
            true => At::Args(Walker::new(&self.shape.args[f])),
            false => At::Head { f, n },
        }
    }

    /// The reply leaves the form before a function is named: text, where it may be.
    fn leave(&mut self) -> bool {
        self.at = At::Free;
        !self.shape.must
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qwen() -> CallForm {
        CallForm {
            start: "<tool_call>\n{\"name\": \"".into(),
            shown: "<tool_call>\n{\"name\": \"".into(),
            mid: "\", \"arguments\": ".into(),
            close: "}\n</tool_call>".into(),
        }
    }

    fn shape(must: bool, given: &str) -> CallShape {
        let unit = Grammar::from_schema(&json!({"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": false}))
        .unwrap();
        let functions = vec![
            ("get_weather".into(), Arc::new(unit)),
            ("get_time".into(), Arc::new(Grammar::any_object())),
        ];
        CallShape::new(&qwen().start, &qwen(), functions, must, given)
    }

    /// Whether `text` keeps to `s` (None: it breaks it), and whether anything may follow.
    fn takes(s: &CallShape, text: &str) -> Option<bool> {
        let mut w = s.walker()?;
        w.push_str(text).then(|| w.is_free())
    }

    /// A call is held from its form's start to its close, each function's arguments to its
    /// own grammar; text that leaves the form before a function is named is free, unless the
    /// reply must call.
    #[test]
    fn a_call_is_held_to_its_function_s_schema() {
        let auto = shape(false, "");
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                    {\"city\": \"Oslo\", \"unit\": \"c\"}}\n</tool_call>";
        for (i, _) in call.char_indices() {
            assert_eq!(takes(&auto, &call[..i]), Some(false), "{:?}", &call[..i]);
        }
        // Whole: free from there (more calls, the end).
        assert_eq!(takes(&auto, call), Some(true));
        assert_eq!(takes(&auto, &format!("\n {call}\n<tool_call>")), Some(true));
        let time =
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": 1}}\n</tool_call>";
        assert_eq!(takes(&auto, time), Some(true));
        for broken in [
            // Another's arguments, arguments the schema has not, a key after the arguments.
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"tz\"",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"O\"}",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"O\", \"unit\": \"k",
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": [",
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}, \"arguments\"",
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
        ] {
            assert_eq!(takes(&auto, broken), None, "{broken}");
        }
        // Text, a start left before its end, or a name that is none of the functions': free
        // (the reply is read as text).
        for text in [
            "It is sunny.",
            "<tool_x",
            "<tool_call>\n{\"nam\"",
            "<tool_call>\n{\"name\": \"Dave\"",
            "<tool_call>\n{\"name\": \"get_w\"",
            "<tool_call>\n{\"name\": \"get_time\"}",
        ] {
            assert_eq!(takes(&auto, text), Some(true), "{text}");
        }
        assert_eq!(takes(&auto, "<tool_cal"), Some(false));
        assert_eq!(takes(&auto, ""), Some(false));
        // Made to call: nothing else.
        let must = shape(true, "");
        assert_eq!(takes(&must, "It is"), None);
        assert_eq!(takes(&must, " <tool_call>"), None);
        assert_eq!(takes(&must, "<tool_call>\n{\"name\": \"get_w\""), None);
        assert_eq!(takes(&must, "<tool_call>\n{\"name\": \"get_time\"}"), None);
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

    /// A name that begins another is told from it where the form puts nothing between name
    /// and arguments, whichever order the functions come in.
    #[test]
    fn names_that_begin_others() {
        let form = CallForm {
            start: "<call>".into(),
            shown: "<call>".into(),
            mid: String::new(),
            close: "</call>".into(),
        };
        for names in [["get", "get_time"], ["get_time", "get"]] {
            let any = || Arc::new(Grammar::any_object());
            let functions = names.iter().map(|n| (n.to_string(), any())).collect();
            let s = CallShape::new("<call>", &form, functions, true, "");
            for call in ["<call>get{}</call>", "<call>get_time{\"a\": 1}</call>"] {
                assert_eq!(takes(&s, call), Some(true), "{names:?}: {call}");
            }
            assert_eq!(takes(&s, "<call>get_t{"), None);
            assert_eq!(takes(&s, "<call>ge{"), None);
        }
    }

    #[test]
    fn textless_tokens_only_where_the_reply_may_be_text() {
        let auto = shape(false, "");
        let mut w = auto.walker().unwrap();
        assert!(w.takes_textless());
        assert!(w.push_str("<tool_call>\n{\"name\": \"get_ti"));
        assert!(w.takes_textless());
        assert!(w.push_str("me\", \"arguments\": "));
        assert!(!w.takes_textless());
        assert!(w.push_str("{\"a\": \"b"));
        assert!(!w.takes_textless() && w.in_plain_string());
        assert!(w.push_str("\"}}\n</tool"));
        assert!(!w.takes_textless());
        assert!(w.push_str("_call>"));
        assert!(w.takes_textless() && w.is_free());
        assert!(!shape(true, "").walker().unwrap().takes_textless());
        // Its lead written, a forced call is in that function's arguments.
        let forced = shape(true, "<tool_call>\n{\"name\": \"");
        let mut w = forced.walker().unwrap();
        w.at_arguments(0);
        assert!(w.push_str("{\"city\": \"a\", \"unit\": \"f\"}"));
        assert!(!w.clone().push('x'));
    }
}
