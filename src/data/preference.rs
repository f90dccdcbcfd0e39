//! Preference data (`train --method dpo|orpo`, `eval --method …`): JSONL rows of a prompt and
//! two answers, the chosen one and the rejected one, in the forms TRL and the datasets on the
//! Hub use:
//!
//! - `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}` (conversational);
//! - `{"prompt": "…", "chosen": "…", "rejected": "…"}` (plain strings);
//! - `{"chosen": [full chat], "rejected": [full chat]}`, the prompt being what both share
//!   before their last (assistant) message;
//! - `{"chosen": "…", "rejected": "…"}`, the prompt being the text both share (TRL's split).
//!
//! Each side is rendered with the model's chat template (plain strings as a user turn and an
//! assistant turn, as `{"prompt", "completion"}` SFT rows are; as text + EOS without a
//! template), and only the answer's tokens are scored, up to and including its end-of-turn
//! token.

use super::batch::Row;
use super::files::read_lines;
use super::{check_message, kind, DataError, Encoder, Example, Record, Sample};
use serde_json::{json, Map, Value};
use std::path::Path;

/// One preference row, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum PreferenceExample {
    /// Plain strings.
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    /// Messages: the prompt's, then each answer's (assistant turns).
    Chat {
        prompt: Vec<Value>,
        chosen: Vec<Value>,
        rejected: Vec<Value>,
        tools: Option<Vec<Value>>,
    },
}

/// A pair encoded for one model: both sides' token ids, each scoring its answer only.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub chosen: Sample,
    pub rejected: Sample,
}

/// Reads a preference file; every bad line is reported as `file:line`.
pub fn read_preferences(path: &Path) -> Result<Vec<(PreferenceExample, String)>, DataError> {
    read_lines(path, parse_preference)
}

/// One line's pair, its form detected from the keys.
pub fn parse_preference(text: &str) -> Result<PreferenceExample, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(obj) = value else {
        return Err("expected a JSON object, one preference pair per line".into());
    };
    for key in ["chosen", "rejected"] {
        if !obj.contains_key(key) {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(format!(
                "`{key}` is missing (keys: {}); a preference row has \"chosen\" and \"rejected\" \
                 answers, and a \"prompt\" unless both are whole chats",
                if keys.is_empty() {
                    "none".to_string()
                } else {
                    keys.join(", ")
                }
            ));
        }
    }
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(t)) => Some(t.clone()),
        Some(other) => return Err(format!("`tools` must be a list, found {}", kind(other))),
    };
    let example = match (obj.get("prompt"), &obj["chosen"], &obj["rejected"]) {
        (Some(Value::String(p)), Value::String(c), Value::String(r)) => PreferenceExample::Text {
            prompt: p.clone(),
            chosen: c.clone(),
            rejected: r.clone(),
        },
        (Some(prompt), chosen, rejected) => PreferenceExample::Chat {
            prompt: messages("prompt", prompt, "user")?,
            chosen: answer_turns("chosen", answer("chosen", chosen)?)?,
            rejected: answer_turns("rejected", answer("rejected", rejected)?)?,
            tools,
        },
        (None, Value::Array(_), Value::Array(_)) => implicit_prompt(&obj, tools)?,
        (None, Value::String(c), Value::String(r)) => implicit_text_prompt(c, r)?,
        (None, _, _) => {
            return Err(
                "`prompt` is missing: give a \"prompt\", or \"chosen\" and \"rejected\" as whole \
                 chats (both lists of messages, or both strings) that share their prompt"
                    .into(),
            )
        }
    };
    check_pair(&example)?;
    Ok(example)
}

/// `key`'s messages: a list checked message by message, or a string as one `role` message.
fn messages(key: &str, v: &Value, role: &str) -> Result<Vec<Value>, String> {
    match v {
        Value::String(s) => Ok(vec![json!({"role": role, "content": s})]),
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| check_message(key, i, m))
            .collect(),
        other => Err(format!(
            "`{key}` must be a string or a list of {{\"role\", \"content\"}} messages, found {}",
            kind(other)
        )),
    }
}

/// An answer: assistant messages (a string is one), not empty.
fn answer(key: &str, v: &Value) -> Result<Vec<Value>, String> {
    let list = messages(key, v, "assistant")?;
    let Some(last) = list.last() else {
        return Err(format!(
            "`{key}` is empty: the answer needs at least one assistant message"
        ));
    };
    if last.get("role").and_then(Value::as_str) != Some("assistant") {
        return Err(format!(
            "`{key}` must end with an assistant message (the answer that is scored)"
        ));
    }
    Ok(list)
}

/// Beside a `prompt`, an answer holds the assistant's turns only (with tools' results between
/// them): a user or system turn in it would give the two answers different prompts.
fn answer_turns(key: &str, list: Vec<Value>) -> Result<Vec<Value>, String> {
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        if !matches!(role, "assistant" | "tool") {
            return Err(format!(
                "`{key}` message {i} is a {role} message: beside a \"prompt\", an answer holds \
                 the assistant's turns only; put earlier turns in the prompt"
            ));
        }
    }
    Ok(list)
}

/// `{"chosen": [chat], "rejected": [chat]}`: the prompt is each chat before its last message,
/// and must be the same in both.
fn implicit_prompt(
    obj: &Map<String, Value>,
    tools: Option<Vec<Value>>,
) -> Result<PreferenceExample, String> {
    let chosen = answer("chosen", &obj["chosen"])?;
    let rejected = answer("rejected", &obj["rejected"])?;
    let (cp, ca) = chosen.split_at(chosen.len() - 1);
    let (rp, ra) = rejected.split_at(rejected.len() - 1);
    if cp != rp {
        let at = cp
            .iter()
            .zip(rp)
            .position(|(a, b)| a != b)
            .unwrap_or(cp.len().min(rp.len()));
        return Err(format!(
            "the prompts differ between chosen and rejected (from message {at}): without a \
             \"prompt\" key both chats must be the same up to their last, assistant message"
        ));
    }
    Ok(PreferenceExample::Chat {
        prompt: cp.to_vec(),
        chosen: ca.to_vec(),
        rejected: ra.to_vec(),
        tools,
    })
}

/// `{"chosen": "…", "rejected": "…"}`, TRL's standard implicit prompt (Anthropic's HH rows):
/// the prompt is the text both share, and each answer the rest, from the space before where
/// they part, as TRL splits them.
fn implicit_text_prompt(chosen: &str, rejected: &str) -> Result<PreferenceExample, String> {
    let mut at = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map_or(chosen.len().min(rejected.len()), |((i, _), _)| i);
    if chosen[..at].ends_with(' ') {
        at -= 1;
    }
    if at == 0 {
        return Err(
            "`prompt` is missing, and chosen and rejected share no text to take as the prompt: \
             give a \"prompt\""
                .into(),
        );
    }
    Ok(PreferenceExample::Text {
        prompt: chosen[..at].to_string(),
        chosen: chosen[at..].to_string(),
        rejected: rejected[at..].to_string(),
    })
}

fn is_blank(answer: &[Value]) -> bool {
    answer.iter().all(|m| match m.get("content") {
        Some(Value::String(s)) => s.trim().is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        _ => m.get("tool_calls").is_none(),
    })
}

/// An empty answer, or two equal ones, teach nothing.
fn check_pair(example: &PreferenceExample) -> Result<(), String> {
    let (blank_c, blank_r, same) = match example {
        PreferenceExample::Text {
            chosen, rejected, ..
        } => (
            chosen.trim().is_empty(),
            rejected.trim().is_empty(),
            chosen == rejected,
        ),
        PreferenceExample::Chat {
            chosen, rejected, ..
        } => (is_blank(chosen), is_blank(rejected), chosen == rejected),
    };
    if blank_c || blank_r {
        let which = if blank_c { "chosen" } else { "rejected" };
        return Err(format!("the {which} answer is empty"));
    }
    if same {
        return Err("chosen and rejected are identical, so there is no preference to learn".into());
    }
    Ok(())
}

impl Encoder<'_> {
    /// Both sides of a pair as samples scoring their answers only; `location` names the line.
    /// None when `max_seq_length` leaves a side no answer token (the prompt fills it), or cuts
    /// both to the same tokens: such a pair has no preference left to learn.
    pub fn encode_pair(
        &self,
        ex: &PreferenceExample,
        location: &str,
    ) -> Result<Option<Pair>, DataError> {
        let side = |which: &str| -> Result<Sample, DataError> {
            let (example, first) = match ex {
                PreferenceExample::Text {
                    prompt,
                    chosen,
                    rejected,
                } => (
                    Example::Completion {
                        prompt: prompt.clone(),
                        completion: if which == "chosen" { chosen } else { rejected }.clone(),
                    },
                    0,
                ),
                PreferenceExample::Chat {
                    prompt,
                    chosen,
                    rejected,
                    tools,
                } => {
                    let answer = if which == "chosen" { chosen } else { rejected };
                    let mut messages = prompt.clone();
                    messages.extend(answer.iter().cloned());
                    (
                        Example::Chat {
                            messages,
                            tools: tools.clone(),
                        },
                        prompt.len(),
                    )
                }
            };
            let rec = Record {
                example,
                location: location.to_string(),
                fields: Map::new(),
            };
            self.encode_from(&rec, first)
        };
        let (chosen, rejected) = (side("chosen")?, side("rejected")?);
        // Cut to the same tokens (answers that part only past the limit), the pair's gradients
        // cancel: nothing is left to learn from it.
        let same = chosen.ids == rejected.ids && chosen.trained == rejected.trained;
        Ok(
            (chosen.trained_count() > 0 && rejected.trained_count() > 0 && !same)
                .then_some(Pair { chosen, rejected }),
        )
    }

    /// Every pair of a file's rows, all failures reported together; with the locations of the
    /// pairs left out as [`Encoder::encode_pair`] leaves them.
    pub fn encode_pairs(
        &self,
        rows: &[(PreferenceExample, String)],
    ) -> Result<(Vec<Pair>, Vec<String>), DataError> {
        let mut pairs = Vec::with_capacity(rows.len());
        let (mut cut_off, mut errors) = (vec![], vec![]);
        for (ex, location) in rows {
            match self.encode_pair(ex, location) {
                Ok(Some(p)) => pairs.push(p),
                Ok(None) => cut_off.push(location.clone()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            return Err(DataError::invalid(errors));
        }
        Ok((pairs, cut_off))
    }
}

/// The rows of pairs: chosen then rejected, pair after pair.
pub fn pair_rows(pairs: &[Pair]) -> Vec<Row> {
    pairs
        .iter()
        .flat_map(|p| [Row::single(&p.chosen, 1.0), Row::single(&p.rejected, 1.0)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_are_read() {
        let conv = r#"{"prompt": [{"role": "user", "content": "Capital?"}], "chosen": [{"role": "assistant", "content": "Marrowick."}], "rejected": [{"role": "assistant", "content": "Dunmere."}]}"#;
        let PreferenceExample::Chat { prompt, chosen, .. } = parse_preference(conv).unwrap() else {
            panic!("conversational")
        };
        assert_eq!((prompt.len(), chosen.len()), (1, 1));
        let text = r#"{"prompt": "Capital?", "chosen": "Marrowick.", "rejected": "Dunmere."}"#;
        assert!(matches!(
            parse_preference(text).unwrap(),
            PreferenceExample::Text { .. }
        ));
        let implicit = r#"{"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Marrowick."}], "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Dunmere."}]}"#;
        let PreferenceExample::Chat {
            prompt, rejected, ..
        } = parse_preference(implicit).unwrap()
        else {
            panic!("implicit")
        };
        assert_eq!(prompt.len(), 2);
        assert_eq!(rejected[0]["content"], "Dunmere.");
        // A string prompt with message answers becomes a user turn.
        let mixed = r#"{"prompt": "Capital?", "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"}"#;
        let PreferenceExample::Chat {
            prompt, rejected, ..
        } = parse_preference(mixed).unwrap()
        else {
            panic!("mixed")
        };
        assert_eq!(prompt[0]["role"], "user");
        assert_eq!(rejected[0]["role"], "assistant");
        // Strings sharing their prompt (Anthropic's HH rows): split where they part, the
        // answers from the space before it.
        let hh = "\n\nHuman: Capital?\n\nAssistant: Marrowick, née Mar.";
        let row = json!({"chosen": hh, "rejected": hh.replace("Marrowick, née Mar.", "Dunmere.")});
        let PreferenceExample::Text {
            prompt,
            chosen,
            rejected,
        } = parse_preference(&row.to_string()).unwrap()
        else {
            panic!("implicit strings")
        };
        assert_eq!(prompt, "\n\nHuman: Capital?\n\nAssistant:");
        assert_eq!(
            (chosen.as_str(), rejected.as_str()),
            (" Marrowick, née Mar.", " Dunmere.")
        );
        // Parting at a multi-byte character splits at its boundary.
        let row = json!({"chosen": "Q: é", "rejected": "Q: è"});
        let PreferenceExample::Text { prompt, .. } = parse_preference(&row.to_string()).unwrap()
        else {
            panic!("accents")
        };
        assert_eq!(prompt, "Q:");
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        let u = r#"{"role": "user", "content": "Q"}"#;
        let a = |c: &str| format!(r#"{{"role": "assistant", "content": "{c}"}}"#);
        for (line, needle) in [
            (
                r#"{"prompt": "Q", "chosen": "A"}"#.to_string(),
                "`rejected` is missing",
            ),
            (
                r#"{"prompt": "Q", "rejected": "A"}"#.to_string(),
                "`chosen` is missing",
            ),
            (
                r#"{"prompt": "Q", "chosen": " ", "rejected": "B"}"#.to_string(),
                "chosen answer is empty",
            ),
            (
                r#"{"prompt": "Q", "chosen": "A", "rejected": ""}"#.to_string(),
                "rejected answer is empty",
            ),
            (
                r#"{"prompt": "Q", "chosen": "A", "rejected": "A"}"#.to_string(),
                "identical",
            ),
            (
                format!(
                    r#"{{"prompt": [{u}], "chosen": [], "rejected": [{}]}}"#,
                    a("B")
                ),
                "`chosen` is empty",
            ),
            (
                format!(
                    r#"{{"prompt": [{u}], "chosen": [{u}], "rejected": [{}]}}"#,
                    a("B")
                ),
                "end with an assistant",
            ),
            (
                format!(
                    r#"{{"prompt": [{u}], "chosen": [{u}, {}], "rejected": [{}]}}"#,
                    a("A"),
                    a("B")
                ),
                "`chosen` message 0 is a user message: beside a \"prompt\"",
            ),
            (
                format!(
                    r#"{{"chosen": [{u}, {}], "rejected": [{}, {}]}}"#,
                    a("A"),
                    r#"{"role": "user", "content": "Other"}"#,
                    a("B")
                ),
                "prompts differ between chosen and rejected (from message 0)",
            ),
            (
                r#"{"chosen": "A", "rejected": "B"}"#.to_string(),
                "share no text to take as the prompt",
            ),
            (
                r#"{"chosen": "Q A", "rejected": "Q A and more"}"#.to_string(),
                "chosen answer is empty",
            ),
            (
                r#"{"chosen": "A", "rejected": [{"role": "assistant", "content": "B"}]}"#
                    .to_string(),
                "`prompt` is missing",
            ),
            (
                r#"{"prompt": 3, "chosen": "A", "rejected": "B"}"#.to_string(),
                "`prompt` must be a string or a list",
            ),
            (
                format!(
                    r#"{{"prompt": [{{"role": "wizard", "content": "x"}}], "chosen": [{}], "rejected": [{}]}}"#,
                    a("A"),
                    a("B")
                ),
                "prompt[0] has unknown role",
            ),
            ("[1]".to_string(), "JSON object"),
        ] {
            let e = parse_preference(&line).unwrap_err();
            assert!(e.contains(needle), "{line}: {e}");
        }
    }

    #[test]
    fn bad_lines_are_reported_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prefs.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"Q\", \"chosen\": \"A\", \"rejected\": \"B\"}\n{\"prompt\": \"Q\", \"chosen\": \"A\"}\n",
        )
        .unwrap();
        let e = read_preferences(&p).unwrap_err().to_string();
        assert!(e.contains("prefs.jsonl:2: `rejected` is missing"), "{e}");
    }
}
