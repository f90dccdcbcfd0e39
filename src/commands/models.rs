//! `your_ai models`: the aliases, their repositories, and which are cached locally.

use crate::error::Result;
use crate::model::source::{hf_cache_dir, is_cached, ALIASES};

pub fn run() -> Result<()> {
    println!("{:<24} {:<56} local", "alias", "repository");
    for (alias, repo) in ALIASES {
        let here = if is_cached(repo) { "yes" } else { "no" };
        println!("{alias:<24} {repo:<56} {here}");
    }
    println!("\nHugging Face cache: {}", hf_cache_dir().display());
    println!("Any org/name repository id, Hugging Face model directory or .gguf file also works as --model.");
    Ok(())
}
