//! One module per subcommand: each turns parsed flags into calls on the library.

pub mod benchmark;
pub mod chat;
pub mod estimate;
pub mod eval;
pub mod export_adapter;
pub mod fuse;
pub mod generate;
pub mod models;
pub mod prepare;
pub mod recommend;
pub mod score;
pub mod serve;
pub mod setup;
pub mod train;
pub mod validate;

use crate::cli::{Cli, Command};
use crate::error::Result;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run(*args),
        Command::Models => models::run(),
        Command::Fuse(args) => fuse::run(args),
        Command::ExportAdapter(args) => export_adapter::run(args),
        Command::Estimate(args) => estimate::run(args),
        Command::Benchmark(args) => benchmark::run(args),
        Command::Recommend(args) => recommend::run(args),
        Command::Setup => setup::run(),
        Command::Score(args) => score::run(args),
        Command::Prepare(args) => prepare::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Chat(args) => chat::run(args),
    }
}
