//! One module per subcommand: each turns parsed flags into calls on the library.

pub mod eval;
pub mod export_adapter;
pub mod fuse;
pub mod generate;
pub mod models;
pub mod train;

use crate::cli::{Cli, Command, ModelArgs};
use crate::device::{select_device, select_dtype};
use crate::error::Result;
use crate::lora::Adapter;
use crate::model::LoadedModel;
use std::path::Path;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run(*args),
        Command::Models => models::run(),
        Command::Fuse(args) => fuse::run(args),
        Command::ExportAdapter(args) => export_adapter::run(args),
    }
}

/// Loads the model named by the shared model flags.
pub fn load_model(args: &ModelArgs) -> Result<LoadedModel> {
    let device = select_device(args.device)?;
    let dtype = select_dtype(args.dtype, &device);
    tracing::info!("loading {} on {:?} in {:?}", args.model, device, dtype);
    crate::model::load(&args.model, &device, dtype)
}

/// Loads the model and, when given, applies a PEFT LoRA adapter to it.
pub fn load_model_with_adapter(args: &ModelArgs, adapter: Option<&Path>) -> Result<LoadedModel> {
    let mut loaded = load_model(args)?;
    if let Some(dir) = adapter {
        let a = Adapter::load_peft(dir, &loaded.model.cfg, &loaded.model.device)?;
        tracing::info!(
            "adapter {}: rank {}, {} parameters",
            dir.display(),
            a.cfg.rank,
            a.num_params()
        );
        loaded.model.adapter = Some(a);
    }
    Ok(loaded)
}
