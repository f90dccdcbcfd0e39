//! One module per subcommand: each turns parsed flags into calls on the library.

pub mod eval;
pub mod generate;
pub mod models;

use crate::cli::{Cli, Command, ModelArgs};
use crate::device::{select_device, select_dtype};
use crate::error::Result;
use crate::model::LoadedModel;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Models => models::run(),
    }
}

/// Loads the model named by the shared model flags.
pub fn load_model(args: &ModelArgs) -> Result<LoadedModel> {
    let device = select_device(args.device)?;
    let dtype = select_dtype(args.dtype, &device);
    tracing::info!("loading {} on {:?} in {:?}", args.model, device, dtype);
    crate::model::load(&args.model, &device, dtype)
}
