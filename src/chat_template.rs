//! Chat templates rendered the way Hugging Face transformers renders them: Jinja with
//! `trim_blocks` and `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that writes JSON exactly as Python's `json.dumps` does
//! (non-ASCII kept, `", "` / `": "` separators, Python float spelling).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::{Map, Value as Json};

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
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// What a template sees, as transformers passes it.
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
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
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
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self { env })
    }

    pub fn render(&self, ctx: &ChatContext) -> Result<String, TemplateError> {
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
        let tpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        tpl.render(Value::from_serialize(&vars)).map_err(|e| {
            let text = describe(&e);
            match text.find("RAISED:") {
                Some(i) => TemplateError::Raised(text[i + 7..].trim_end_matches(')').to_string()),
                None => TemplateError::Render(text),
            }
        })
    }
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

/// `tojson(indent=None, separators=None, sort_keys=False)` with Python `json.dumps` output.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    opts.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn write(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => write_json_string(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|a| a.to_string());
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    write_json_string(&k.to_string(), out);
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
            _ => write_json_string(&v.to_string(), out),
        }
        Ok(())
    }
}

/// A JSON string literal as Python writes it with `ensure_ascii=False`.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside 1e-4 ≤ |x| < 1e16.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render_tojson(v: Json, args: &str) -> String {
        let t = ChatTemplate::new(&format!("{{{{ messages[0] | tojson({args}) }}}}")).unwrap();
        t.render(&ChatContext {
            messages: &[v],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let v = json!({"name": "f", "x": 1.0, "y": 1e-5, "n": 3, "s": "é<&>\"\n", "l": [1, {"a": null}], "e": {}});
        assert_eq!(
            render_tojson(v.clone(), ""),
            r#"{"name": "f", "x": 1.0, "y": 1e-05, "n": 3, "s": "é<&>\"\n", "l": [1, {"a": null}], "e": {}}"#
        );
        assert_eq!(
            render_tojson(json!({"a": [1, 2]}), "indent=2"),
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}"
        );
    }

    #[test]
    fn python_floats() {
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(123456.0), "123456.0");
        assert_eq!(python_float(0.0001), "0.0001");
        assert_eq!(python_float(0.00001), "1e-05");
        assert_eq!(python_float(-2.5e-7), "-2.5e-07");
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        let e = t.render(&ChatContext::default()).unwrap_err();
        assert!(
            matches!(&e, TemplateError::Raised(m) if m.contains("roles must alternate")),
            "{e}"
        );
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
