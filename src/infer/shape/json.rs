//! A recogniser of JSON-object prefixes, character by character: whether a text can still
//! become one JSON object, and whether it is one. Its state is `Copy` (the nesting held as
//! bits), so each candidate token is tried on a copy without allocating.

/// Deepest nesting a reply may reach (objects and arrays together).
pub const MAX_DEPTH: u8 = 64;

/// Most whitespace characters in a row outside strings: room for pretty-printing, but no
/// reply that is blank lines for ever.
const MAX_BLANK_RUN: u8 = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object's `{`.
    Start,
    /// A value is due (after `:`, or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrClose,
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value in a container: `,` or its close.
    CommaOrClose,
    /// Inside a string; `key`: it is an object's key.
    Str { key: bool },
    /// After a backslash in a string.
    Escape { key: bool },
    /// In a `\u` escape, `left` hex digits to go.
    Unicode { key: bool, left: u8 },
    /// In `true`, `false` or `null`: the letters still due.
    Literal { rest: &'static str },
    /// In a number.
    Number(Num),
    /// The top-level object is closed.
    Done,
}

/// Where a number is: after its `-`, its leading `0`, integer digits, `.`, fraction digits,
/// `e`, the exponent's sign, exponent digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    /// Whether the number may end here.
    fn whole(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }

    fn next(self, c: char) -> Option<Num> {
        use Num::*;
        Some(match (self, c) {
            (Minus, '0') => Zero,
            (Minus, '1'..='9') => Int,
            (Int, '0'..='9') => Int,
            (Zero | Int, '.') => Dot,
            (Dot | Frac, '0'..='9') => Frac,
            (Zero | Int | Frac, 'e' | 'E') => E,
            (E, '+' | '-') => ESign,
            (E | ESign | Exp, '0'..='9') => Exp,
            _ => return None,
        })
    }
}

/// How far a text has come towards one JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonObject {
    mode: Mode,
    /// The open containers, innermost in bit `depth - 1`: 1 an object, 0 an array.
    open: u64,
    depth: u8,
    blank_run: u8,
}

impl Default for JsonObject {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonObject {
    pub fn new() -> Self {
        Self {
            mode: Mode::Start,
            open: 0,
            depth: 0,
            blank_run: 0,
        }
    }

    /// Whether the text so far is one whole JSON object.
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Takes `text`; false (and `self` is then unspecified) where it cannot go on a JSON
    /// object's prefix. U+FFFD stands for bytes of a character not yet whole: they can only
    /// be inside a string.
    pub fn push_str(&mut self, text: &str) -> bool {
        text.chars().all(|c| self.push(c))
    }

    /// Takes one character; false where it cannot go on a JSON object's prefix.
    pub fn push(&mut self, c: char) -> bool {
        let blank = matches!(c, ' ' | '\t' | '\n' | '\r');
        match self.mode {
            Mode::Str { key } => return self.in_string(c, key),
            Mode::Escape { key } => {
                self.mode = match c {
                    '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => Mode::Str { key },
                    'u' => Mode::Unicode { key, left: 4 },
                    _ => return false,
                };
                return true;
            }
            Mode::Unicode { key, left } => {
                if !c.is_ascii_hexdigit() {
                    return false;
                }
                self.mode = match left {
                    1 => Mode::Str { key },
                    _ => Mode::Unicode {
                        key,
                        left: left - 1,
                    },
                };
                return true;
            }
            Mode::Literal { rest } => {
                let mut chars = rest.chars();
                if chars.next() != Some(c) {
                    return false;
                }
                let rest = chars.as_str();
                self.mode = if rest.is_empty() {
                    Mode::CommaOrClose
                } else {
                    Mode::Literal { rest }
                };
                return true;
            }
            Mode::Number(n) => match n.next(c) {
                Some(n) => {
                    self.mode = Mode::Number(n);
                    return true;
                }
                // The number ends here; the character is read after it.
                None if n.whole() => self.mode = Mode::CommaOrClose,
                None => return false,
            },
            _ => {}
        }
        // The reply opens with its `{`: blank lines first are of no use to anyone.
        if blank && self.mode != Mode::Start {
            self.blank_run += 1;
            return self.blank_run <= MAX_BLANK_RUN;
        }
        self.blank_run = 0;
        match (self.mode, c) {
            (Mode::Start, '{') => self.open(true),
            (Mode::Value | Mode::ValueOrClose, _) if self.value(c) => true,
            (Mode::ValueOrClose, ']') => self.close(false),
            (Mode::KeyOrClose | Mode::Key, '"') => {
                self.mode = Mode::Str { key: true };
                true
            }
            (Mode::KeyOrClose, '}') => self.close(true),
            (Mode::Colon, ':') => {
                self.mode = Mode::Value;
                true
            }
            (Mode::CommaOrClose, ',') => {
                self.mode = if self.innermost_is_object() {
                    Mode::Key
                } else {
                    Mode::Value
                };
                true
            }
            (Mode::CommaOrClose, '}') => self.close(true),
            (Mode::CommaOrClose, ']') => self.close(false),
            _ => false,
        }
    }

    fn in_string(&mut self, c: char, key: bool) -> bool {
        match c {
            '"' => {
                self.mode = if key { Mode::Colon } else { Mode::CommaOrClose };
                true
            }
            '\\' => {
                self.mode = Mode::Escape { key };
                true
            }
            // Control characters must be escaped.
            c => c >= ' ',
        }
    }

    /// Begins a value with `c`, if one can begin so.
    fn value(&mut self, c: char) -> bool {
        self.mode = match c {
            '{' => return self.open(true),
            '[' => return self.open(false),
            '"' => Mode::Str { key: false },
            't' => Mode::Literal { rest: "rue" },
            'f' => Mode::Literal { rest: "alse" },
            'n' => Mode::Literal { rest: "ull" },
            '-' => Mode::Number(Num::Minus),
            '0' => Mode::Number(Num::Zero),
            '1'..='9' => Mode::Number(Num::Int),
            _ => return false,
        };
        true
    }

    fn open(&mut self, object: bool) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        if object {
            self.open |= 1 << self.depth;
        } else {
            self.open &= !(1 << self.depth);
        }
        self.depth += 1;
        self.mode = if object {
            Mode::KeyOrClose
        } else {
            Mode::ValueOrClose
        };
        true
    }

    fn innermost_is_object(&self) -> bool {
        self.depth > 0 && self.open & (1 << (self.depth - 1)) != 0
    }

    /// Closes the innermost container, if it is an object (`object`) or an array.
    fn close(&mut self, object: bool) -> bool {
        if self.depth == 0 || self.innermost_is_object() != object {
            return false;
        }
        self.depth -= 1;
        self.mode = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::CommaOrClose
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(text: &str) -> Option<JsonObject> {
        let mut s = JsonObject::new();
        s.push_str(text).then_some(s)
    }

    #[test]
    fn whole_objects_are_complete_and_serde_agrees() {
        for text in [
            "{}",
            r#"{"a": 1}"#,
            "{\n  \"a\": [1, -2.5e+3, 0, 0.25E-2, true, false, null],\n  \"b\": {\"c\": \"\\u00e9\\n\\\"x\"}\n}",
            r#"{"k":[[],[{}],{"x":[]}],"s":"é ✓ 😀"}"#,
        ] {
            let s = accepts(text).unwrap_or_else(|| panic!("refused {text}"));
            assert!(s.is_complete(), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(text).unwrap().is_object());
            // Every proper prefix is accepted and not complete.
            for (i, _) in text.char_indices().skip(1) {
                let p = accepts(&text[..i]).unwrap_or_else(|| panic!("refused {:?}", &text[..i]));
                assert!(!p.is_complete() || text[i..].trim().is_empty(), "{:?}", &text[..i]);
            }
        }
    }

    #[test]
    fn what_no_object_can_begin_or_go_on_with_is_refused() {
        for text in [
            "[1]",
            "\"a\"",
            "1",
            "x",
            "{a",
            "{\"a\" 1",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":01",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":[1}",
            "{\"a\":{]",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12g4\"}",
            "{\"a\":\"line\nbreak\"}",
            "{}}",
            "{} {}",
            "{\"a\":1e}",
        ] {
            assert!(accepts(text).is_none(), "accepted {text:?}");
            assert!(
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).is_err()
            );
        }
        // JSON, but the reply opens with its object.
        assert!(accepts(" {}").is_none() && accepts("\n{}").is_none());
        // Bytes of an unfinished character (U+FFFD) only inside a string.
        assert!(accepts("{\"a\":\"\u{FFFD}").is_some());
        assert!(accepts("{\u{FFFD}").is_none());
    }

    #[test]
    fn nesting_and_blank_runs_are_bounded() {
        let deep = "{\"a\":".to_string() + &"[".repeat(MAX_DEPTH as usize - 1);
        assert!(accepts(&deep).is_some());
        assert!(accepts(&(deep + "[")).is_none());
        let blank = format!("{{{}", " ".repeat(MAX_BLANK_RUN as usize));
        assert!(accepts(&blank).is_some());
        assert!(accepts(&(blank + "\n")).is_none());
        // Runs end at anything else: pretty-printing may go on and on.
        let long = format!("{{\"a\":{}1{}}}", "\n".repeat(40), " ".repeat(40));
        assert!(accepts(&long).unwrap().is_complete());
    }
}
