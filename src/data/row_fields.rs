//! A JSONL row written back with some fields set, every other value kept as its text.
//!
//! `score` and `prepare` add scores to the user's rows. Parsed into JSON values and written
//! out again, numbers past 64 bits changed (`99999999999999999999` became `1e+20`) and
//! `1e2` became `100.0`; an id a later join depends on was silently another.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// The row's keys (unescaped) with their values' text, in order.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Each;
        impl<'de> Visitor<'de> for Each {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                let mut out = vec![];
                while let Some(entry) = m.next_entry::<String, &'de RawValue>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Each)
    }
}

/// `line` (one JSON object) with each of `fields` set: in its place where the row has the key
/// (a repeated key once, where it first was), else at the end.
pub fn with_fields(line: &str, fields: &[(&str, Value)]) -> Result<String, String> {
    let Entries(entries) =
        serde_json::from_str(line).map_err(|e| format!("not a JSON object ({e})"))?;
    let key = |k: &str| serde_json::to_string(k).map_err(|e| e.to_string());
    let set = |k: &str| fields.iter().find(|(name, _)| *name == k).map(|(_, v)| v);
    let mut parts = Vec::with_capacity(entries.len() + fields.len());
    let mut done: Vec<&str> = vec![];
    for (k, raw) in &entries {
        match set(k) {
            Some(_) if done.contains(&k.as_str()) => {}
            Some(v) => {
                parts.push(format!("{}:{v}", key(k)?));
                done.push(k);
            }
            None => parts.push(format!("{}:{}", key(k)?, raw.get())),
        }
    }
    for (k, v) in fields.iter().filter(|(k, _)| !done.contains(k)) {
        parts.push(format!("{}:{v}", key(k)?));
    }
    Ok(format!("{{{}}}", parts.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn other_values_keep_their_text_and_fields_are_set_in_place_or_added() {
        let line =
            r#"{"id": 99999999999999999999, "x":1e2, "t":"a\"b\u00e9", "w":0.5, "n":{"k":[1, 2]}}"#;
        let out = with_fields(line, &[("w", json!(0.25)), ("h", json!(1.5))]).unwrap();
        assert_eq!(
            out,
            r#"{"id":99999999999999999999,"x":1e2,"t":"a\"b\u00e9","w":0.25,"n":{"k":[1, 2]},"h":1.5}"#
        );
        // The same row as JSON, with the fields set.
        let parsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["t"], "a\"bé");
        assert_eq!(parsed["w"], 0.25);
        // A repeated key is set once.
        let out = with_fields(r#"{"w":1,"w":2,"a":3}"#, &[("w", json!(9))]).unwrap();
        assert_eq!(out, r#"{"w":9,"a":3}"#);
        assert!(with_fields("[1]", &[]).is_err());
    }
}
