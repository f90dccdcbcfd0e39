//! What shape a reply must take, and, token by token, which tokens keep it so: sampling is
//! done among those alone.

pub mod schema;
pub mod walk;

use crate::data::tokenizer::Tokenizer;
use schema::Grammar;
use std::sync::Arc;
use walk::Walker;

/// What a reply must be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Shape {
    /// Anything.
    #[default]
    Free,
    /// One of these token sequences first, the model choosing (a forced call's function
    /// names), then anything.
    OneOf(Vec<Vec<u32>>),
    /// One JSON document of the grammar, then the end (OpenAI's `response_format`
    /// `json_object`, any object, and `json_schema`).
    Json(Arc<Grammar>),
}

impl Shape {
    /// Any one JSON object.
    pub fn json_object() -> Self {
        Shape::Json(Arc::new(Grammar::any_object()))
    }
}

/// Refuses a grammar whose keys or enum values hold a character this model's vocabulary
/// writes only in pieces (SmolLM2 spells emoji so): the guide matches whole characters, so
/// the reply could never write it, and would be stuck there.
pub fn check_writable(grammar: &Grammar, tokenizer: &Tokenizer) -> Result<(), String> {
    let mut texts: Vec<&str> = vec![];
    for node in &grammar.nodes {
        match node {
            schema::Node::Texts(t) => texts.extend(t.iter().map(String::as_str)),
            schema::Node::Object { props, .. } => {
                texts.extend(props.iter().map(|p| p.key.as_str()))
            }
            _ => {}
        }
    }
    let wanted: std::collections::BTreeSet<char> = texts
        .iter()
        .flat_map(|t| t.chars())
        .filter(|c| !c.is_ascii())
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let written: std::collections::HashSet<char> = tokenizer
        .token_texts()
        .iter()
        .flatten()
        .flat_map(|t| t.chars())
        .filter(|c| wanted.contains(c))
        .collect();
    match wanted.iter().find(|c| !written.contains(c)) {
        Some(c) => Err(format!(
            "`{c}` (in a key or an enum value) is written by this model only in pieces, which a \
             reply held to the schema cannot match; leave it out of keys and enum values"
        )),
        None => Ok(()),
    }
}

/// A reply's way through its [`Shape`].
pub struct Guide<'a> {
    shape: &'a Shape,
    tokenizer: &'a Tokenizer,
    /// The JSON so far, for [`Shape::Json`].
    json: Option<Walker<'a>>,
    /// Per token: whether its text can sit in a string as it is (no `"`, `\\` or control
    /// character), and its first character (None: no text, or a special token).
    plain: Vec<bool>,
    first: Vec<Option<char>>,
}

impl<'a> Guide<'a> {
    pub fn new(shape: &'a Shape, tokenizer: &'a Tokenizer) -> Self {
        let json = match shape {
            Shape::Json(g) => Some(Walker::new(g)),
            _ => None,
        };
        let (mut plain, mut first) = (vec![], vec![]);
        if json.is_some() {
            for (id, text) in tokenizer.token_texts().iter().enumerate() {
                // An end token is text only to a tokenizer that does not mark it.
                let text = text.as_deref().filter(|_| !tokenizer.is_end(id as u32));
                first.push(text.and_then(|t| t.chars().next()));
                plain.push(text.is_some_and(|t| {
                    !t.is_empty() && !t.chars().any(|c| c == '"' || c == '\\' || c < ' ')
                }));
            }
        }
        Self {
            shape,
            tokenizer,
            json,
            plain,
            first,
        }
    }

    /// The tokens that may follow `ids`, the reply so far (None: any token may). Empty where
    /// no token of the vocabulary keeps to the shape.
    pub fn allowed(&self, ids: &[u32]) -> Option<Vec<u32>> {
        // A JSON shape has its walker from the start.
        if let Some(w) = &self.json {
            return Some(if w.is_complete() {
                self.tokenizer.end_ids.iter().copied().collect()
            } else {
                self.json_tokens(w)
            });
        }
        match self.shape {
            Shape::OneOf(choices) => one_of(choices, ids),
            _ => None,
        }
    }

    /// The tokens whose text `w` takes. Most are settled without trying them whole: in a
    /// string, a plain text leaves the state as it is; elsewhere, a first character that
    /// cannot come next rules a token out.
    fn json_tokens(&self, w: &Walker) -> Vec<u32> {
        let texts = self.tokenizer.token_texts();
        let in_string = w.in_plain_string();
        // Whether each ASCII first character may come next, found when first met.
        let mut ascii: [Option<bool>; 128] = [None; 128];
        let first_may = |c: char| {
            let mut trial = *w;
            trial.push(c)
        };
        let mut out = vec![];
        for (id, first) in self.first.iter().enumerate() {
            let Some(c) = *first else { continue };
            if in_string && self.plain[id] {
                out.push(id as u32);
                continue;
            }
            let may = match ascii.get_mut(c as usize) {
                Some(known) => *known.get_or_insert_with(|| first_may(c)),
                None => first_may(c),
            };
            if may {
                let mut trial = *w;
                if texts[id].as_deref().is_some_and(|t| trial.push_str(t)) {
                    out.push(id as u32);
                }
            }
        }
        out
    }

    /// Takes the token sampled next.
    pub fn advance(&mut self, id: u32) {
        if let Some(w) = &mut self.json {
            if let Some(Some(text)) = self.tokenizer.token_texts().get(id as usize) {
                w.push_str(text);
            }
        }
    }
}

/// The tokens that may come after `ids` so that they go on with one of `choices`; None once
/// one is complete (or where there are none): what follows is free.
fn one_of(choices: &[Vec<u32>], ids: &[u32]) -> Option<Vec<u32>> {
    let mut next = vec![];
    for c in choices {
        match c.strip_prefix(ids) {
            Some([]) => return None,
            Some([t, ..]) if !next.contains(t) => next.push(*t),
            _ => {}
        }
    }
    (!next.is_empty()).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_allow_the_tokens_that_go_on_with_one() {
        let choices = [vec![1, 2, 3], vec![1, 4], vec![5]];
        assert_eq!(one_of(&choices, &[]), Some(vec![1, 5]));
        assert_eq!(one_of(&choices, &[1]), Some(vec![2, 4]));
        assert_eq!(one_of(&choices, &[1, 2]), Some(vec![3]));
        // Complete: free from there.
        assert_eq!(one_of(&choices, &[1, 4]), None);
        assert_eq!(one_of(&choices, &[1, 4, 9]), None);
        assert_eq!(one_of(&[], &[]), None);
    }
}
