//! your_ai: fine-tune Llama-family chat models with LoRA and QLoRA on one machine.
//!
//! The binary's subcommands live in [`commands`]; everything they stand on is a library so that
//! integration tests can reach it directly.

pub mod chat_template;
pub mod cli;
pub mod commands;
pub mod data;
pub mod device;
pub mod distrust;
pub mod error;
pub mod evaluate;
pub mod export;
pub mod generation;
pub mod hardware;
pub mod kernels;
pub mod lora;
pub mod memory;
pub mod model;
pub mod model_source;
pub mod profile;
pub mod signals;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
