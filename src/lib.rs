//! your_ai: fine-tune Llama-family chat models with LoRA and QLoRA on one machine.
//!
//! Data flows one way: `main.rs` → [`cli`] (flags) → [`commands`] (one file per subcommand) →
//! the library below. [`train`] runs the training loop over an [`engine`], which does the
//! step's arithmetic on the [`model`]; [`data`] turns JSONL into token rows; [`infer`] evaluates
//! and generates; [`export`] writes fused models and adapters; [`runtime`] holds the device,
//! memory, signals and machine presets.

pub mod cli;
pub mod commands;
pub mod data;
pub mod distrust;
pub mod engine;
pub mod error;
pub mod export;
pub mod infer;
pub mod io;
pub mod kernels;
pub mod model;
pub mod runtime;
pub mod serve;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
