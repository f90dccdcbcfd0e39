//! Replies held to a shape: `response_format` `json_object` and `json_schema` through
//! `your_ai serve` with the official `openai` client (tests/fixtures/openai_json.py): greedy
//! and sampled, whole and streamed, every reply one JSON object, and a pydantic model's
//! schema kept to; `generate --json`; and the token texts the shape is checked on.

mod common;
#[path = "common/server.rs"]
mod server;

use common::{cli, smollm2};
use serde_json::Value;
use server::{adapter, base_name, Server};
use your_ai::data::tokenizer::Tokenizer;
use your_ai::weights::GgufFile;

/// Each token's text, as the shape reads it, is what the token adds to a reply: a text's
/// tokens' texts join up to the text (SmolLM2's byte-level tokenizer, leading spaces kept),
/// and a control token has none.
#[test]
fn token_texts_join_up_to_the_text() {
    let tok = Tokenizer::from_gguf(&GgufFile::open(&smollm2()).unwrap()).unwrap();
    let texts = tok.token_texts();
    assert_eq!(texts.len(), tok.vocab_size());
    for text in [
        r#"{"name": "Tom", "age": 3, "foods": ["fish", "milk"]}"#,
        "{\n  \"a\": -1.5e3,\n\t\"b\": \"x\\\"y\"\n}",
        "  two leading spaces, café and naïve",
    ] {
        let ids = tok.encode(text).unwrap();
        let joined: String = ids
            .iter()
            .map(|&i| texts[i as usize].clone().unwrap())
            .collect();
        assert_eq!(joined, text);
    }
    // A character split over tokens reads U+FFFD in each piece.
    let ids = tok.encode("😀").unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    assert!(texts[ids[0] as usize]
        .as_deref()
        .unwrap()
        .contains('\u{FFFD}'));
    let end = tok.token_to_id("<|im_end|>").unwrap();
    assert!(texts[end as usize].is_none());
}

fn object(text: &str) -> Option<serde_json::Map<String, Value>> {
    serde_json::from_str(text).ok()
}

/// With `response_format` `json_object`, every reply that ends is one JSON object, even to a
/// question that does not ask for JSON (answered in prose without it); streamed as whole.
/// With a pydantic model's schema, the reply is one pydantic reads back.
#[test]
fn json_object_replies_are_json_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &adapter(&tmp.path().join("adapter")));
    let got = server.client("openai_json.py", &[&base_name()]);
    for label in ["cat", "capital"] {
        let asked = &got[label];
        let replies = asked["replies"].as_array().unwrap();
        let mut ended = 0;
        for (i, r) in replies.iter().enumerate() {
            let content = r["content"].as_str().unwrap();
            match r["finish"].as_str().unwrap() {
                "stop" => {
                    ended += 1;
                    assert!(object(content).is_some(), "{label} {i}: {content:?}");
                }
                // Cut at max_tokens: a JSON object's beginning.
                _ => assert!(content.trim_start().starts_with('{'), "{content:?}"),
            }
        }
        assert_eq!(
            replies[0]["finish"], "stop",
            "{label}: the greedy reply: {got}"
        );
        assert!(ended >= 2, "{label}: {got}");
        assert_eq!(asked["streamed"], replies[0]["content"], "{label}");
        assert_eq!(asked["streamed_finish"], "stop", "{label}");
    }
    // Without the format, the same model fences its JSON in Markdown and talks on after it.
    for label in ["cat", "capital"] {
        let plain = got[label]["plain"].as_str().unwrap();
        assert!(object(plain).is_none(), "{plain:?}");
        let first = got[label]["replies"][0]["content"].as_str().unwrap();
        assert!(first.starts_with('{'), "{first:?}");
    }
    // A pydantic model through the client's `parse`: the reply validates against it (where
    // the same question without the schema does not), and pydantic reads it back.
    let parsed = &got["parsed"];
    assert_eq!(parsed["finish"], "stop", "{got}");
    let cat = &parsed["cat"];
    assert!(cat["name"].is_string() && cat["age"].is_i64(), "{got}");
    let colour = cat["colour"].as_str().unwrap_or_default();
    assert!(["black", "white", "ginger"].contains(&colour), "{got}");
    assert!(
        cat["owner"].is_null() || cat["owner"]["name"].is_string(),
        "{got}"
    );
    assert!(
        cat["toys"].as_array().is_some_and(|t| t.len() <= 3),
        "{got}"
    );
    assert_eq!(parsed["plain_valid"], false, "{got}");
    // A keyword the reply cannot be held to is refused, named with its place.
    assert_eq!(got["schema"]["status"], 400, "{got}");
    let why = got["schema"]["message"].as_str().unwrap();
    assert!(
        why.contains("json_schema: #/properties/code: `pattern` is not supported"),
        "{why}"
    );
}

/// `generate --json`: the reply on stdout is one JSON object, where the same prompt without it
/// gets Markdown around the JSON; with --ignore-eos, which would go past the object, refused.
#[test]
fn generate_json_prints_one_object() {
    let ask = |extra: &[&str]| {
        cli()
            .args(["generate", "--max-tokens", "60", "--prompt"])
            .arg("Describe a cat as a JSON object with two fields: its name and its age.")
            .arg("--model")
            .arg(smollm2())
            .args(extra)
            .output()
            .unwrap()
    };
    let o = ask(&["--json"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert!(err.contains("stopped: end of turn"), "{err}");
    let reply = object(out.trim_end()).unwrap_or_else(|| panic!("{out:?}"));
    assert!(reply.contains_key("name"), "{out}");
    let o = ask(&[]);
    let plain = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && object(plain.trim_end()).is_none(),
        "{plain}"
    );
    let o = ask(&["--json", "--ignore-eos"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ignore-eos"));
    // A schema from a file: its fields, in its order, of its types.
    let tmp = tempfile::tempdir().unwrap();
    let schema = tmp.path().join("cat.json");
    std::fs::write(
        &schema,
        serde_json::json!({"type": "object", "required": ["age", "name"], "properties": {
            "age": {"type": "integer"}, "name": {"type": "string"},
            "indoor": {"type": "boolean"}}})
        .to_string(),
    )
    .unwrap();
    let o = ask(&["--json-schema", schema.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reply = object(out.trim_end()).unwrap_or_else(|| panic!("{out:?}"));
    let keys: Vec<&str> = reply.keys().map(String::as_str).collect();
    assert!(
        keys.starts_with(&["age", "name"]) && keys.len() <= 3,
        "{out}"
    );
    assert!(reply["age"].is_i64() && reply["name"].is_string(), "{out}");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"code": {"type": "string", "pattern": "x"}}}"#,
    )
    .unwrap();
    let o = ask(&["--json-schema", schema.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("cat.json: #/properties/code: `pattern` is not supported"),
        "{e}"
    );
    // A key this model writes only in pieces could never be matched: refused before a
    // reply begins, where it was a reply stuck half-way.
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["mood"], "properties": {"mood": {"enum": ["🐱", "🐶"]}}}"#,
    )
    .unwrap();
    let o = ask(&["--json-schema", schema.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("only in pieces") && o.stdout.is_empty(), "{e}");
}
