//! Empirical distrust training: per-example loss weights from each example's authority weight
//! `w` and provenance entropy `H` ([`formula`]), the citation scorer that computes `w` and `H`
//! from text and metadata ([`scorer`], constants in [`table`]), corpus preparation
//! ([`prepare`]) and the prompt-suite check of a trained model ([`suite`]).

pub mod args;
pub mod formula;
pub mod plot;
pub mod prepare;
pub mod scorer;
pub mod suite;
pub mod table;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DistrustError {
    /// Bad rows, each reported as `file:line: reason`.
    #[error("{count} invalid row(s):\n{}", shown.join("\n"))]
    Rows { count: usize, shown: Vec<String> },
    #[error("{}: the input holds no examples", path.display())]
    Empty { path: PathBuf },
    #[error("{what}")]
    Input { what: String },
}

impl DistrustError {
    /// Collects `file:line: reason` messages into one error.
    pub fn rows(errors: Vec<String>) -> Self {
        let (count, shown) = crate::io::error_list::first_errors(errors);
        DistrustError::Rows { count, shown }
    }
}
