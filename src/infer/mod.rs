//! Using a model without training it: evaluation loss and token generation.

pub mod eval;
pub mod generate;
pub mod prompt;
pub mod shape;
