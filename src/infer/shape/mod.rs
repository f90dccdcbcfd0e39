//! What shape a reply must take, and, token by token, which tokens keep it so: sampling is
//! done among those alone.

pub mod json;

use crate::data::tokenizer::Tokenizer;
use json::JsonObject;

/// What a reply must be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Shape {
    /// Anything.
    #[default]
    Free,
    /// One of these token sequences first, the model choosing (a forced call's function
    /// names), then anything.
    OneOf(Vec<Vec<u32>>),
    /// One JSON object, then the end (OpenAI's `response_format` `json_object`).
    JsonObject,
}

/// A reply's way through its [`Shape`].
pub struct Guide<'a> {
    shape: &'a Shape,
    tokenizer: &'a Tokenizer,
    /// The JSON so far, for [`Shape::JsonObject`].
    json: JsonObject,
}

impl<'a> Guide<'a> {
    pub fn new(shape: &'a Shape, tokenizer: &'a Tokenizer) -> Self {
        Self {
            shape,
            tokenizer,
            json: JsonObject::new(),
        }
    }

    /// The tokens that may follow `ids`, the reply so far (None: any token may). Empty where
    /// no token of the vocabulary keeps to the shape.
    pub fn allowed(&self, ids: &[u32]) -> Option<Vec<u32>> {
        match self.shape {
            Shape::Free => None,
            Shape::OneOf(choices) => one_of(choices, ids),
            Shape::JsonObject if self.json.is_complete() => {
                Some(self.tokenizer.end_ids.iter().copied().collect())
            }
            Shape::JsonObject => Some(
                self.tokenizer
                    .token_texts()
                    .iter()
                    .enumerate()
                    .filter(|&(id, text)| {
                        // An end token is text only to a tokenizer that does not mark it.
                        !self.tokenizer.is_end(id as u32)
                            && text.as_deref().is_some_and(|t| {
                                let mut s = self.json;
                                !t.is_empty() && s.push_str(t)
                            })
                    })
                    .map(|(id, _)| id as u32)
                    .collect(),
            ),
        }
    }

    /// Takes the token sampled next.
    pub fn advance(&mut self, id: u32) {
        if *self.shape == Shape::JsonObject {
            if let Some(Some(text)) = self.tokenizer.token_texts().get(id as usize) {
                self.json.push_str(text);
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
