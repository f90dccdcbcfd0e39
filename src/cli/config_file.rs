//! `train --config FILE.yaml`: a mapping of flag names (with `-` or `_`) to values, merged by
//! value into the parsed arguments. A value applies where the command line gave none; each is
//! checked as the flag's own type, and an error names the file and the key.

use super::TrainArgs;
use crate::error::{Error, Result};
use clap::CommandFactory;
use std::path::Path;

/// `no_X: true` in a file means `X: false`: the positive field is the one that holds.
const NEGATED: &[(&str, &str)] = &[
    ("no_mask_prompt", "mask_prompt"),
    ("no_save_best", "save_best"),
];

/// Merges the file at `path` into `args`: settings the command line gave win; the others
/// (and those the file gives) are recorded in `args.given`.
pub fn merge(args: &mut TrainArgs, path: &Path) -> Result<()> {
    let bad = |msg: String| Error::Usage(format!("--config {}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| bad(format!("not valid YAML: {e}")))?;
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => Default::default(),
        _ => return Err(bad("expected a mapping of flag names to values".into())),
    };
    let known = train_flag_ids();
    let mut merged = serde_json::to_value(&*args).map_err(|e| bad(e.to_string()))?;
    let mut given = args.given.clone();
    for (k, v) in map {
        let name = k
            .as_str()
            .ok_or_else(|| bad(format!("key {k:?} is not a string")))?
            .replace('-', "_");
        let flag = name.replace('_', "-");
        if !known.contains(&name) || name == "config" {
            return Err(bad(format!(
                "`{flag}` is not a train flag (see `your_ai train --help`)"
            )));
        }
        let mut value: serde_json::Value =
            serde_json::to_value(&v).map_err(|e| bad(format!("`{flag}`: {e}")))?;
        let (field, negated) = match NEGATED.iter().find(|(no, _)| *no == name) {
            Some((_, positive)) => (positive.to_string(), true),
            None => (name.clone(), false),
        };
        if negated {
            value = match value {
                serde_json::Value::Bool(b) => serde_json::Value::Bool(!b),
                other => other,
            };
        }
        if args.given.contains(&name) || args.given.contains(&field) {
            continue;
        }
        merged[&field] = value;
        // Each value checked on its own, so the error names its key.
        serde_json::from_value::<TrainArgs>(merged.clone())
            .map_err(|e| bad(format!("`{flag}`: {e}")))?;
        given.insert(field);
    }
    let mut out: TrainArgs = serde_json::from_value(merged).map_err(|e| bad(e.to_string()))?;
    out.config = args.config.take();
    out.given = given;
    *args = out;
    Ok(())
}

/// The names of `train`'s flags, as their fields are named (`lora_rank`).
fn train_flag_ids() -> Vec<String> {
    let cmd = super::Cli::command();
    cmd.find_subcommand("train")
        .map(|t| {
            t.get_arguments()
                .filter(|a| a.get_long().is_some())
                .map(|a| a.get_id().to_string())
                .collect()
        })
        .unwrap_or_default()
}
