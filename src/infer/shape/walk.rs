//! A recogniser of a grammar's JSON, character by character: whether a text can still become
//! a document of the [`Grammar`], and whether it is one. Its state is `Copy` (a fixed stack of
//! small frames), so each candidate token is tried on a copy without allocating.

pub use super::grammar::MAX_DEPTH;
use super::grammar::{Grammar, Node, NodeId, ANY, ANY_ARRAY, ANY_OBJECT, LITERALS};

/// Most whitespace characters in a row outside strings: room for pretty-printing, but no
/// reply that is blank lines for ever.
const MAX_BLANK_RUN: u8 = 48;

/// Longest number, in characters: no reply that is digits for ever.
const MAX_NUMBER: u8 = 40;

/// A free object's key, in an object frame's `Colon`.
const FREE_KEY: u8 = u8::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// A value of this node is due.
    Value(NodeId),
    /// In a string; `key`: a free object's key.
    Str { key: bool, esc: Esc },
    /// In a number, `len` characters in; `int`: an integer (no fraction or exponent).
    Number { num: Num, int: bool, len: u8 },
    /// In one of a node's texts (`cands`: which, as bits), `done` bytes in.
    Texts { node: NodeId, cands: u64, done: u16 },
    Array {
        node: NodeId,
        count: u32,
        at: ArrayAt,
    },
    /// `next`: the first of its listed properties that may still be written.
    Object {
        node: NodeId,
        next: u8,
        at: ObjectAt,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    No,
    Backslash,
    /// In a `\u` escape, this many hex digits to go.
    Hex(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayAt {
    Open,
    /// After an item.
    Item,
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectAt {
    Open,
    /// In a listed key (`cands`: which, as bits), `done` bytes in.
    Key {
        cands: u64,
        done: u16,
    },
    /// After key `prop` (or a free key): `:` is due.
    Colon {
        prop: u8,
    },
    /// After a value.
    Value,
    Comma,
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

    fn next(self, c: char, int: bool) -> Option<Num> {
        use Num::*;
        Some(match (self, c) {
            (Minus, '0') => Zero,
            (Minus, '1'..='9') => Int,
            (Int, '0'..='9') => Int,
            (Zero | Int, '.') if !int => Dot,
            (Dot | Frac, '0'..='9') => Frac,
            (Zero | Int | Frac, 'e' | 'E') if !int => E,
            (E, '+' | '-') => ESign,
            (E | ESign | Exp, '0'..='9') => Exp,
            _ => return None,
        })
    }
}

/// How far a text has come towards a document of `grammar`.
#[derive(Debug, Clone, Copy)]
pub struct Walker<'g> {
    grammar: &'g Grammar,
    stack: [Frame; MAX_DEPTH],
    len: u8,
    /// The root value is whole.
    done: bool,
    /// Whether anything was read (the reply opens with its value, no blank first).
    begun: bool,
    blank_run: u8,
    /// Line breaks in the current blank run.
    breaks: u8,
}

impl<'g> Walker<'g> {
    pub fn new(grammar: &'g Grammar) -> Self {
        Self {
            grammar,
            // The root's value is due; the rest is room.
            stack: [Frame::Value(0); MAX_DEPTH],
            len: 1,
            done: false,
            begun: false,
            blank_run: 0,
            breaks: 0,
        }
    }

    /// Whether the text so far is one whole document.
    pub fn is_complete(&self) -> bool {
        self.done
    }

    /// Whether the reply is inside a string, where any text without `"`, `\\` or a control
    /// character leaves the state as it is.
    pub fn in_plain_string(&self) -> bool {
        self.len > 0
            && matches!(
                self.stack[self.len as usize - 1],
                Frame::Str { esc: Esc::No, .. }
            )
    }

    /// Takes `text`; false (and `self` is then unspecified) where it cannot go on a
    /// document's prefix. U+FFFD stands for bytes of a character not yet whole: they can
    /// only be inside a string.
    pub fn push_str(&mut self, text: &str) -> bool {
        text.chars().all(|c| self.push(c))
    }

    fn top(&mut self) -> &mut Frame {
        &mut self.stack[self.len as usize - 1]
    }

    fn node(&self, id: NodeId) -> &'g Node {
        &self.grammar.nodes[id as usize]
    }

    fn open(&mut self, frame: Frame) -> bool {
        if self.len as usize >= MAX_DEPTH {
            return false;
        }
        self.stack[self.len as usize] = frame;
        self.len += 1;
        true
    }

    /// The top frame's value is whole: its container (if any) goes on after it.
    fn close_value(&mut self) {
        self.len -= 1;
        if self.len == 0 {
            self.done = true;
            return;
        }
        match self.top() {
            Frame::Array { at, .. } => *at = ArrayAt::Item,
            Frame::Object { at, .. } => *at = ObjectAt::Value,
            _ => {}
        }
    }

    /// Takes one character; false where it cannot go on a document's prefix.
    pub fn push(&mut self, c: char) -> bool {
        let began = self.begun;
        self.begun = true;
        // A number or a text ends at a character that cannot go on with it, which its
        // container then reads: hence the loop.
        loop {
            if self.len == 0 {
                return false;
            }
            match *self.top() {
                Frame::Str { key, esc } => return self.string(c, key, esc),
                Frame::Number { num, int, len } => match num.next(c, int) {
                    Some(num) if len < MAX_NUMBER => {
                        *self.top() = Frame::Number {
                            num,
                            int,
                            len: len + 1,
                        };
                        return true;
                    }
                    Some(_) => return false,
                    None if num.whole() => self.close_value(),
                    None => return false,
                },
                Frame::Texts { node, cands, done } => {
                    let Node::Texts(texts) = self.node(node) else {
                        return false;
                    };
                    let d = done as usize;
                    let next = bits(texts.len(), cands, |i| {
                        texts[i].get(d..).is_some_and(|rest| rest.starts_with(c))
                    });
                    if next != 0 {
                        let done = done + c.len_utf8() as u16;
                        *self.top() = Frame::Texts {
                            node,
                            cands: next,
                            done,
                        };
                        return true;
                    }
                    if bits(texts.len(), cands, |i| texts[i].len() == d) == 0 {
                        return false;
                    }
                    self.close_value();
                }
                Frame::Object {
                    node,
                    next,
                    at: ObjectAt::Key { cands, done },
                } => return self.key(c, node, next, cands, done),
                _ => break,
            }
        }
        if matches!(c, ' ' | '\t' | '\n' | '\r') {
            self.blank_run += 1;
            // One line break between two parts, as pretty-printing writes them.
            self.breaks += u8::from(c == '\n');
            return began && self.blank_run <= MAX_BLANK_RUN && self.breaks <= 1;
        }
        self.blank_run = 0;
        self.breaks = 0;
        match *self.top() {
            Frame::Value(n) => {
                self.len -= 1;
                self.start(n, c)
            }
            Frame::Array { node, count, at } => self.in_array(c, node, count, at),
            Frame::Object { node, next, at } => self.in_object(c, node, next, at),
            _ => false,
        }
    }

    /// Begins a value of node `n` with `c`, if one can begin so.
    fn start(&mut self, n: NodeId, c: char) -> bool {
        let number = |int| Frame::Number {
            num: match c {
                '-' => Num::Minus,
                '0' => Num::Zero,
                _ => Num::Int,
            },
            int,
            len: 1,
        };
        let is_number = c == '-' || c.is_ascii_digit();
        match self.node(n) {
            Node::Any => match c {
                '{' => self.start(ANY_OBJECT, c),
                '[' => self.start(ANY_ARRAY, c),
                '"' => self.open(Frame::Str {
                    key: false,
                    esc: Esc::No,
                }),
                't' | 'f' | 'n' => self.start(LITERALS, c),
                _ if is_number => self.open(number(false)),
                _ => false,
            },
            Node::Integer if is_number => self.open(number(true)),
            Node::Number if is_number => self.open(number(false)),
            Node::String if c == '"' => self.open(Frame::Str {
                key: false,
                esc: Esc::No,
            }),
            Node::Texts(texts) => {
                let cands = bits(texts.len(), u64::MAX, |i| texts[i].starts_with(c));
                cands != 0
                    && self.open(Frame::Texts {
                        node: n,
                        cands,
                        done: c.len_utf8() as u16,
                    })
            }
            Node::Array { .. } if c == '[' => self.open(Frame::Array {
                node: n,
                count: 0,
                at: ArrayAt::Open,
            }),
            Node::Object { .. } if c == '{' => self.open(Frame::Object {
                node: n,
                next: 0,
                at: ObjectAt::Open,
            }),
            Node::OneOf(ids) => {
                let saved = *self;
                for &id in ids {
                    if saved.fits(id) && self.start(id, c) {
                        return true;
                    }
                    *self = saved;
                }
                false
            }
            _ => false,
        }
    }

    fn string(&mut self, c: char, key: bool, esc: Esc) -> bool {
        let esc = match (esc, c) {
            (Esc::No, '"') => {
                if key {
                    self.len -= 1;
                    if let Frame::Object { at, .. } = self.top() {
                        *at = ObjectAt::Colon { prop: FREE_KEY };
                    }
                } else {
                    self.close_value();
                }
                return true;
            }
            (Esc::No, '\\') => Esc::Backslash,
            // Control characters must be escaped.
            (Esc::No, c) => return c >= ' ',
            (Esc::Backslash, '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') => Esc::No,
            (Esc::Backslash, 'u') => Esc::Hex(4),
            (Esc::Hex(left), c) if c.is_ascii_hexdigit() => match left {
                1 => Esc::No,
                _ => Esc::Hex(left - 1),
            },
            _ => return false,
        };
        *self.top() = Frame::Str { key, esc };
        true
    }

    fn in_array(&mut self, c: char, node: NodeId, count: u32, at: ArrayAt) -> bool {
        let Node::Array { items, min, max } = self.node(node) else {
            return false;
        };
        // Another item only where it can be whole.
        let room = max.is_none_or(|m| (count as usize) < m) && self.fits(*items);
        match (at, c) {
            (ArrayAt::Item, ',') if room => {
                *self.top() = Frame::Array {
                    node,
                    count,
                    at: ArrayAt::Comma,
                };
                true
            }
            (ArrayAt::Open | ArrayAt::Item, ']') if count as usize >= *min => {
                self.close_value();
                true
            }
            (ArrayAt::Open | ArrayAt::Comma, _) if room => {
                *self.top() = Frame::Array {
                    node,
                    count: count + 1,
                    at: ArrayAt::Item,
                };
                self.start(*items, c)
            }
            _ => false,
        }
    }

    fn in_object(&mut self, c: char, node: NodeId, next: u8, at: ObjectAt) -> bool {
        let Node::Object { props, free } = self.node(node) else {
            return false;
        };
        // Listed properties that may come next: on to the first required one, each where
        // its value can be whole.
        let mut may = 0u64;
        for (i, p) in props.iter().enumerate().skip(next as usize) {
            if self.fits(p.value) {
                may |= 1 << i;
            }
            if p.required {
                break;
            }
        }
        let may_close = !props.iter().skip(next as usize).any(|p| p.required);
        let set = |w: &mut Self, at| *w.top() = Frame::Object { node, next, at };
        match (at, c) {
            // A key only where its value can still be opened after it.
            (ObjectAt::Open | ObjectAt::Comma, '"') if self.len as usize >= MAX_DEPTH => false,
            (ObjectAt::Open | ObjectAt::Comma, '"') if *free => {
                set(self, ObjectAt::Value);
                self.open(Frame::Str {
                    key: true,
                    esc: Esc::No,
                })
            }
            (ObjectAt::Open | ObjectAt::Comma, '"') if may != 0 => {
                set(
                    self,
                    ObjectAt::Key {
                        cands: may,
                        done: 1,
                    },
                );
                true
            }
            (ObjectAt::Open | ObjectAt::Value, '}') if may_close => {
                self.close_value();
                true
            }
            (ObjectAt::Value, ',') if *free || may != 0 => {
                set(self, ObjectAt::Comma);
                true
            }
            (ObjectAt::Colon { prop }, ':') => {
                set(self, ObjectAt::Value);
                let value = match props.get(prop as usize) {
                    Some(p) => p.value,
                    None => ANY,
                };
                self.open(Frame::Value(value))
            }
            _ => false,
        }
    }

    /// Whether a whole value of node `n` fits on the stack as it is.
    fn fits(&self, n: NodeId) -> bool {
        let need = self
            .grammar
            .need
            .get(n as usize)
            .copied()
            .unwrap_or(u8::MAX);
        self.len as usize + need as usize <= MAX_DEPTH
    }

    /// A character of a listed key, `done` bytes in.
    fn key(&mut self, c: char, node: NodeId, next: u8, cands: u64, done: u16) -> bool {
        let Node::Object { props, .. } = self.node(node) else {
            return false;
        };
        let d = done as usize;
        let cands = bits(props.len(), cands, |i| {
            props[i]
                .key
                .get(d..)
                .is_some_and(|rest| rest.starts_with(c))
        });
        if cands == 0 {
            return false;
        }
        let done = done + c.len_utf8() as u16;
        // The closing quote ends one key: keys are quoted, and no two are the same.
        let whole = (0..props.len())
            .find(|&i| cands & (1 << i) != 0 && props[i].key.len() == done as usize);
        let at = match whole {
            Some(i) if c == '"' => {
                *self.top() = Frame::Object {
                    node,
                    next: i as u8 + 1,
                    at: ObjectAt::Colon { prop: i as u8 },
                };
                return true;
            }
            _ => ObjectAt::Key { cands, done },
        };
        *self.top() = Frame::Object { node, next, at };
        true
    }
}

/// The bits of `cands` (among the first `n`) whose index passes `keep`.
fn bits(n: usize, cands: u64, keep: impl Fn(usize) -> bool) -> u64 {
    (0..n.min(64))
        .filter(|&i| cands & (1 << i) != 0 && keep(i))
        .fold(0, |acc, i| acc | 1 << i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_object() -> &'static Grammar {
        static G: std::sync::OnceLock<Grammar> = std::sync::OnceLock::new();
        G.get_or_init(Grammar::any_object)
    }

    fn accepts(text: &str) -> Option<Walker<'static>> {
        accepts_in(any_object(), text)
    }

    fn accepts_in<'g>(g: &'g Grammar, text: &str) -> Option<Walker<'g>> {
        let mut s = Walker::new(g);
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
        let deep = "{\"a\":".to_string() + &"[".repeat(MAX_DEPTH - 1);
        assert!(accepts(&deep).is_some());
        assert!(accepts(&(deep + "[")).is_none());
        let blank = format!("{{{}", " ".repeat(MAX_BLANK_RUN as usize));
        assert!(accepts(&blank).is_some());
        assert!(accepts(&(blank + "\n")).is_none());
        // Runs end at anything else: pretty-printing may go on and on, a line break a gap.
        let long = format!("{{\"a\":\n{}1\n{}}}", " ".repeat(40), " ".repeat(40));
        assert!(accepts(&long).unwrap().is_complete());
        assert!(accepts("{\n\n").is_none() && accepts("{\n \n").is_none());
        // Numbers end.
        assert!(accepts(&format!("{{\"a\":{}", "7".repeat(MAX_NUMBER as usize))).is_some());
        assert!(accepts(&format!("{{\"a\":{}", "7".repeat(MAX_NUMBER as usize + 1))).is_none());
        // No key where its value could not be opened: the reply would be stuck after it.
        let g = Grammar::from_schema(&serde_json::json!({"$defs": {"N": {"type": "object",
            "properties": {"c": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}))
        .unwrap();
        let deepest = "{\"c\":".repeat(MAX_DEPTH - 1) + "{";
        let mut w = accepts_in(&g, &deepest).unwrap();
        assert!(accepts_in(&g, &(deepest.clone() + "\"")).is_none());
        assert!(w.push('}'));
    }

    /// A value is begun only where it can be whole: no reply is led where nesting would
    /// have to go past the limit to finish it. A schema that needs that from the root is
    /// refused.
    #[test]
    fn nothing_is_begun_that_cannot_end_within_the_nesting() {
        // `d` holds a chain of five required objects; `c` goes down a level.
        let deep = (0..5).fold(serde_json::json!({"type": "object"}), |inner, _| {
            serde_json::json!({"type": "object", "properties": {"x": inner},
                "required": ["x"]})
        });
        let g = Grammar::from_schema(&serde_json::json!({"$defs": {"N": {"type": "object",
            "properties": {"c": {"$ref": "#/$defs/N"}, "d": deep}}}, "$ref": "#/$defs/N"}))
        .unwrap();
        let five = "{\"x\":".repeat(5) + "{" + &"}".repeat(6);
        let (mut opened, mut closed) = (0, 0);
        for k in 0..MAX_DEPTH {
            let down = "{\"c\":".repeat(k) + "{";
            if accepts_in(&g, &down).is_none() {
                break;
            }
            opened = k;
            if accepts_in(&g, &format!("{down}\"d\":")).is_some() {
                let whole = format!("{down}\"d\":{five}{}", "}".repeat(k + 1));
                let w = accepts_in(&g, &whole).unwrap_or_else(|| panic!("stuck at {k}"));
                assert!(w.is_complete(), "{k}");
                closed = k;
            }
        }
        // `d` is offered while six more levels fit, and `c` on to the limit.
        assert_eq!((closed, opened), (MAX_DEPTH - 7, MAX_DEPTH - 1));
        let chain = |n: usize| {
            (0..n).fold(serde_json::json!({"type": "object"}), |inner, _| {
                serde_json::json!({"type": "object", "properties": {"x": inner},
                    "required": ["x"]})
            })
        };
        assert!(Grammar::from_schema(&chain(MAX_DEPTH - 1)).is_ok());
        let e = Grammar::from_schema(&chain(MAX_DEPTH)).unwrap_err();
        assert!(e.contains("nest more than 24 deep"), "{e}");
    }

    /// Documents of a schema are taken, each prefix on the way; what breaks it is refused at
    /// the character that breaks it.
    #[test]
    fn a_schema_s_documents_and_nothing_else() {
        let g = Grammar::from_schema(&serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": ["integer", "null"]},
                "mood": {"enum": ["calm", "cross", 1, 10]},
                "tags": {"type": "array", "items": {"type": "boolean"},
                         "minItems": 1, "maxItems": 2},
                "next": {"$ref": "#"}
            },
            "required": ["name", "age"]
        }))
        .unwrap();
        for text in [
            r#"{"name": "Tom", "age": 3}"#,
            r#"{"name":"T\"o","age":null,"mood":"cross"}"#,
            r#"{"name": "a", "age": -2, "mood": 10, "tags": [true, false]}"#,
            r#"{"name": "a", "age": 0, "mood": 1, "next": {"name": "b", "age": 1}}"#,
            "{\n  \"name\": \"x\",\n  \"age\": 7,\n  \"tags\": [ false ]\n}",
        ] {
            let w = accepts_in(&g, text).unwrap_or_else(|| panic!("refused {text}"));
            assert!(w.is_complete(), "{text}");
            for (i, _) in text.char_indices().skip(1) {
                let p = accepts_in(&g, &text[..i]);
                assert!(p.is_some_and(|p| !p.is_complete()), "{:?}", &text[..i]);
            }
        }
        for text in [
            r#"{"age": 3, "name": "Tom"}"#,
            r#"{"name": "Tom"}"#,
            r#"{"name": 3"#,
            r#"{"name": "a", "age": 1.5"#,
            r#"{"name": "a", "age": 1e3"#,
            r#"{"name": "a", "age": 1, "mood": "calmer""#,
            r#"{"name": "a", "age": 1, "mood": 100"#,
            r#"{"name": "a", "age": 1, "tags": []"#,
            r#"{"name": "a", "age": 1, "tags": [true, true, false"#,
            r#"{"name": "a", "age": 1, "colour": "#,
            r#"{"name": "a", "age": 1, "name": "#,
            r#"{"name": "a", "age": 1, "next": {}"#,
            r#"{"name": "a", "age": 1}}"#,
        ] {
            assert!(accepts_in(&g, text).is_none(), "accepted {text}");
        }
    }
}
