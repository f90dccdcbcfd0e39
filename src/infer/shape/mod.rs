//! What shape a reply must take, and, token by token, which tokens keep it so: sampling is
//! done among those alone.

pub mod call;
pub mod grammar;
pub mod schema;
pub mod walk;

use crate::data::tokenizer::Tokenizer;
use call::{CallShape, CallWalker};
use schema::Grammar;
use std::sync::Arc;
use walk::Walker;

/// What a reply must be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Shape {
    /// Anything.
    #[default]
    Free,
    /// A call in the chat template's form, its arguments held to the function's grammar,
    /// where the reply calls (or must).
    Call(Arc<CallShape>),
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
    match unwritable(&texts, tokenizer) {
        Some(c) => Err(format!(
            "`{c}` (in a key or an enum value) is written by this model only in pieces, which a \
             reply held to the schema cannot match; leave it out of keys and enum values"
        )),
        None => Ok(()),
    }
}

/// A character of `texts` that no token of the vocabulary holds whole (the guide matches
/// whole characters, so a reply held to it would be stuck there).
pub fn unwritable(texts: &[&str], tokenizer: &Tokenizer) -> Option<char> {
    let wanted: std::collections::BTreeSet<char> = texts
        .iter()
        .flat_map(|t| t.chars())
        .filter(|c| !c.is_ascii())
        .collect();
    if wanted.is_empty() {
        return None;
    }
    let written: std::collections::HashSet<char> = tokenizer
        .token_texts()
        .iter()
        .flatten()
        .flat_map(|t| t.chars())
        .filter(|c| wanted.contains(c))
        .collect();
    wanted.into_iter().find(|c| !written.contains(c))
}

/// A reply's way through its [`Shape`].
pub struct Guide<'a> {
    tokenizer: &'a Tokenizer,
    at: Walking<'a>,
    /// Token sequences the reply starts with one of, until it has written one, and the
    /// tokens written so far.
    lead: Option<&'a [Vec<u32>]>,
    led: Vec<u32>,
    /// Per token: whether its text can sit in a string as it is (no `"`, `\\` or control
    /// character), and its first character (None: no text, or a special token).
    plain: Vec<bool>,
    first: Vec<Option<char>>,
}

/// Where the reply is in its shape.
enum Walking<'a> {
    Free,
    Json(Walker<'a>),
    Call(CallWalker<'a>),
    /// Where a call's given opening is none of its forms: the reply cannot go on.
    Stuck,
}

/// What [`Guide::scan`] tries tokens against.
trait Trial: Copy {
    fn push_str(&mut self, text: &str) -> bool;
    fn push(&mut self, c: char) -> bool;
}

impl Trial for Walker<'_> {
    fn push_str(&mut self, text: &str) -> bool {
        Walker::push_str(self, text)
    }
    fn push(&mut self, c: char) -> bool {
        Walker::push(self, c)
    }
}

impl Trial for CallWalker<'_> {
    fn push_str(&mut self, text: &str) -> bool {
        CallWalker::push_str(self, text)
    }
    fn push(&mut self, c: char) -> bool {
        CallWalker::push(self, c)
    }
}

impl<'a> Guide<'a> {
    pub fn new(shape: &'a Shape, tokenizer: &'a Tokenizer) -> Self {
        let at = match shape {
            Shape::Free => Walking::Free,
            Shape::Json(g) => Walking::Json(Walker::new(g)),
            Shape::Call(c) => c.walker().map_or(Walking::Stuck, Walking::Call),
        };
        let (mut plain, mut first) = (vec![], vec![]);
        if !matches!(at, Walking::Free) {
            for (id, text) in tokenizer.token_texts().iter().enumerate() {
                // An end token is text only to a tokenizer that does not mark it.
                let text = text.as_deref().filter(|_| !tokenizer.is_end(id as u32));
                first.push(text.and_then(|t| t.chars().next()));
                plain.push(text.is_some_and(|t| {
                    !t.is_empty() && !t.chars().any(|c| c == '"' || c == '\\' || c < ' ')
                }));
            }
        }
        let lead = match shape {
            Shape::Call(c) if !c.lead.is_empty() => Some(c.lead.as_slice()),
            _ => None,
        };
        Self {
            tokenizer,
            at,
            lead,
            led: vec![],
            plain,
            first,
        }
    }

    /// The tokens that may follow `ids`, the reply so far (None: any token may). Empty where
    /// no token of the vocabulary keeps to the shape.
    pub fn allowed(&self, ids: &[u32]) -> Option<Vec<u32>> {
        if let Some(next) = self.lead.and_then(|lead| one_of(lead, ids)) {
            return Some(next);
        }
        match &self.at {
            Walking::Free => None,
            Walking::Stuck => Some(vec![]),
            Walking::Json(w) if w.is_complete() => {
                Some(self.tokenizer.end_ids.iter().copied().collect())
            }
            Walking::Json(w) => Some(self.scan(w, w.in_plain_string(), false)),
            Walking::Call(w) if w.is_free() => None,
            Walking::Call(w) => Some(self.scan(w, w.in_plain_string(), w.takes_textless())),
        }
    }

    /// The tokens whose text `w` takes (and, with `textless`, those with none). Most are
    /// settled without trying them whole: in a plain string, a plain text leaves the state as
    /// it is; elsewhere, a first character that cannot come next rules a token out.
    fn scan(&self, w: &impl Trial, in_string: bool, textless: bool) -> Vec<u32> {
        let texts = self.tokenizer.token_texts();
        // Whether each ASCII first character may come next, found when first met.
        let mut ascii: [Option<bool>; 128] = [None; 128];
        let first_may = |c: char| {
            let mut trial = *w;
            trial.push(c)
        };
        let mut out = vec![];
        for (id, first) in self.first.iter().enumerate() {
            let Some(c) = *first else {
                if textless {
                    out.push(id as u32);
                }
                continue;
            };
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
        if let Some(lead) = self.lead {
            self.led.push(id);
            if let Some(f) = lead.iter().position(|l| *l == self.led) {
                // A forced call's function is chosen: its arguments are next, whatever text
                // the lead's tokens read as.
                self.lead = None;
                if let Walking::Call(w) = &mut self.at {
                    w.at_arguments(f);
                }
                return;
            }
        }
        let Some(Some(text)) = self.tokenizer.token_texts().get(id as usize) else {
            return;
        };
        match &mut self.at {
            Walking::Json(w) => {
                w.push_str(text);
            }
            Walking::Call(w) => {
                w.push_str(text);
            }
            Walking::Free | Walking::Stuck => {}
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
