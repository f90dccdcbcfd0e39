//! The Llama-family transformer: where its files come from, its configuration, the one load
//! function, its weights (dense or quantized), rotary embedding tables, LoRA adapters, the
//! block (forward and backward, for inference and training) and its ops.

pub mod args;
pub mod block;
pub mod config;
pub mod decode;
pub mod llama;
pub mod load;
pub mod lora;
pub mod ops;
pub mod quantized;
pub mod rope;
pub mod sliced;
pub mod source;
pub mod vocab;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use llama::{KvCache, Llama};
pub use load::{identify, inspect, load, Identity, Inspected, LoadOptions, LoadedModel};
