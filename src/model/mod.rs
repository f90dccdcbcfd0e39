//! The Llama-family transformer: configuration, rotary embeddings and the forward pass.

pub mod config;
pub mod llama;
pub mod quantized;
pub mod rope;
pub mod sliced;
pub mod vocab;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use llama::{KvCache, Llama};
pub mod load;
pub use load::{inspect, load, load_with, Inspected, LoadedModel};
