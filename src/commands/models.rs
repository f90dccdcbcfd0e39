//! `your_ai models`: the aliases, their repositories, and which are cached locally.

use crate::error::Result;
use crate::model::source::{cached_snapshot, hf_cache_dir, ALIASES};

pub fn run() -> Result<()> {
    let cache = hf_cache_dir();
    // A cache that cannot be read shows every model as absent: say why.
    if cache.exists() && !cache.is_dir() {
        eprintln!(
            "warning: the Hugging Face cache {} is not a directory (HF_HUB_CACHE or HF_HOME?)",
            cache.display()
        );
    }
    println!("{:<24} {:<56} local", "alias", "repository");
    for (alias, repo) in ALIASES {
        let here = match cached_snapshot(&cache, repo) {
            Ok(Some(snap)) if has_weights(&snap) => "yes".to_string(),
            // What an interrupted download, or one of the config alone, leaves.
            Ok(Some(_)) => "config only (no weights)".to_string(),
            Ok(None) => "no".to_string(),
            Err(e) => format!("broken: {e}"),
        };
        println!("{alias:<24} {repo:<56} {here}");
    }
    println!("\nHugging Face cache: {}", cache.display());
    println!("Any org/name repository id, Hugging Face model directory or .gguf file also works as --model.");
    Ok(())
}

/// Whether a snapshot holds safetensors weights (one file, or an index of shards).
fn has_weights(snapshot: &std::path::Path) -> bool {
    ["model.safetensors", "model.safetensors.index.json"]
        .iter()
        .any(|f| snapshot.join(f).is_file())
}
