//! `train --config FILE.yaml`: a mapping of flag names (with `-` or `_`) to values, merged by
//! value into the parsed arguments. A value applies where the command line gave none; each is
//! checked as the flag's own type, and an error names the file and the key.

use super::TrainArgs;
use crate::error::{Error, Result};
use clap::CommandFactory;
use std::path::Path;

/// Each `X` with its `--no-X`: one setting. `no_X: true` in a file means `X: false`, and either
/// flag on the command line wins over either key.
const PAIRS: &[(&str, &str)] = &[
    ("mask_prompt", "no_mask_prompt"),
    ("save_best", "no_save_best"),
    ("distrust", "no_distrust"),
];

/// Whether `v` is, or holds, a NaN or an infinity (`.nan`, `.inf` in YAML).
fn non_finite(v: &serde_yaml::Value) -> bool {
    use serde_yaml::Value;
    match v {
        Value::Number(n) => n.as_f64().is_some_and(|f| !f.is_finite()),
        Value::Sequence(items) => items.iter().any(non_finite),
        Value::Mapping(m) => m.values().any(non_finite),
        Value::Tagged(t) => non_finite(&t.value),
        _ => false,
    }
}

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
    // Fields the file sets, with the key that set them.
    let mut from_file: std::collections::HashMap<String, String> = Default::default();
    for (k, v) in map {
        let key = k
            .as_str()
            .ok_or_else(|| bad(format!("key {k:?} is not a string")))?;
        let name = key.replace('-', "_");
        let flag = name.replace('_', "-");
        // Required on the command line (every command takes it there), so a file's would
        // always lose to it, unseen.
        if name == "model" {
            return Err(bad(
                "`model`: give the model on the command line (--model); the file holds the \
                 run's other settings"
                    .into(),
            ));
        }
        if !known.contains(&name) || name == "config" {
            return Err(bad(format!(
                "`{flag}` is not a train flag (see `your_ai train --help`)"
            )));
        }
        // JSON has no NaN or infinity: converted, they would read as "not given".
        if non_finite(&v) {
            return Err(bad(format!(
                "`{key}`: not a finite number; give a number (or leave the key out)"
            )));
        }
        if let Some(why) = refused_by_flag(&name, &v) {
            return Err(bad(format!("`{key}`: {why}")));
        }
        let mut value: serde_json::Value =
            serde_json::to_value(&v).map_err(|e| bad(format!("`{flag}`: {e}")))?;
        let pair = PAIRS.iter().find(|(x, no)| *x == name || *no == name);
        let field = pair.map_or(name.clone(), |(x, _)| x.to_string());
        let not = |v: serde_json::Value| match v {
            serde_json::Value::Bool(b) => serde_json::Value::Bool(!b),
            other => other,
        };
        if field != name {
            value = not(value);
        }
        // `resume: true` is the bare `--resume` (the latest checkpoint), `false` no resume; a
        // string is the flag's PATH.
        if field == "resume" {
            value = match value {
                serde_json::Value::Bool(true) => serde_json::Value::String(String::new()),
                serde_json::Value::Bool(false) => serde_json::Value::Null,
                other => other,
            };
        }
        // As written in the file: `lora_rank` and `lora-rank` are the same flag.
        if let Some(earlier) = from_file.insert(field.clone(), key.to_string()) {
            return Err(bad(format!(
                "`{key}` and `{earlier}` both set `{}`; keep one",
                field.replace('_', "-")
            )));
        }
        // Each value checked as its flag's type, so the error names its key, even where the
        // command line overrides it.
        let mut probe = merged.clone();
        probe[&field] = value.clone();
        serde_json::from_value::<TrainArgs>(probe).map_err(|e| bad(format!("`{flag}`: {e}")))?;
        let on_command_line = |id: &str| args.given.contains(id);
        if on_command_line(&field) || pair.is_some_and(|(_, no)| on_command_line(no)) {
            continue;
        }
        // A flag the command line gave wins over a key it conflicts with (`max-steps` over
        // `epochs`), as over the key's own flag; two conflicting keys are an error.
        let rivals = conflicting(&field);
        if let Some(c) = rivals.iter().find(|c| args.given.contains(*c)) {
            eprintln!(
                "note: --config {}: `{flag}` is not used: the command line gives --{}",
                path.display(),
                c.replace('_', "-")
            );
            from_file.remove(&field);
            continue;
        }
        if let Some(c) = rivals.iter().find_map(|c| from_file.get(c)) {
            return Err(bad(format!(
                "`{flag}` and `{c}` cannot both be given; keep one"
            )));
        }
        // A `--no-X` kept as its own field (distrust's, which has a third state: unset, on
        // when the data is scored) is set with `X`.
        if let Some((_, no)) = pair.filter(|(_, no)| merged.get(*no).is_some()) {
            merged[*no] = not(value.clone());
        }
        merged[&field] = value;
        given.insert(field);
    }
    let mut out: TrainArgs = serde_json::from_value(merged).map_err(|e| bad(e.to_string()))?;
    // Not serialized (a run's train_config.json does not record it), so not in `merged`: the
    // command line's --force was lost whenever --config was given.
    out.output.force |= args.output.force;
    out.config = args.config.take();
    out.given = given;
    *args = out;
    Ok(())
}

/// Why the flag `id`'s own parser refuses the number `v`, where it does: `max_memory: 0` gets
/// `--max-memory`'s message, not a later one that cannot name the file, and `keep_activations:
/// -1` its own, not serde's "untagged enum". Strings are left to serde, which spells some
/// values differently from the command line.
fn refused_by_flag(id: &str, v: &serde_yaml::Value) -> Option<String> {
    let serde_yaml::Value::Number(n) = v else {
        return None;
    };
    let text = n.to_string();
    // `--flag=VALUE`: a negative number is the flag's value, not another flag.
    let flag = format!("--{}={text}", id.replace('_', "-"));
    let e = super::Cli::command()
        .try_get_matches_from(["your_ai", "train", "--model", "x", &flag])
        .err()?;
    use clap::error::ErrorKind;
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    use std::error::Error as _;
    Some(match e.source() {
        Some(why) => format!("{text}: {why}"),
        None => format!("{text}: not a value --{} takes", id.replace('_', "-")),
    })
}

/// The train flags that conflict with `id` (clap's `conflicts_with`), by field name.
fn conflicting(id: &str) -> Vec<String> {
    let cmd = super::Cli::command();
    let Some(train) = cmd.find_subcommand("train") else {
        return vec![];
    };
    // Declared on either side (`max_steps` names `epochs`; clap lists it from that side only).
    let names_it = |a: &clap::Arg| {
        train
            .get_arg_conflicts_with(a)
            .iter()
            .any(|c| c.get_id() == id)
    };
    let mut out: Vec<String> = train
        .get_arguments()
        .filter(|a| a.get_id() != id && names_it(a))
        .map(|a| a.get_id().to_string())
        .collect();
    if let Some(arg) = train.get_arguments().find(|a| a.get_id() == id) {
        out.extend(
            train
                .get_arg_conflicts_with(arg)
                .iter()
                .map(|a| a.get_id().to_string()),
        );
    }
    out
}

/// The names of `train`'s flags, as their fields are named (`lora_rank`). Hidden flags (for
/// tests) are not settings a file can give.
fn train_flag_ids() -> Vec<String> {
    let cmd = super::Cli::command();
    cmd.find_subcommand("train")
        .map(|t| {
            t.get_arguments()
                .filter(|a| a.get_long().is_some() && !a.is_hide_set())
                .map(|a| a.get_id().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use crate::cli::{parse_from, Command, TrainArgs};

    fn train(yaml: &str, flags: &[&str]) -> TrainArgs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut argv = vec!["your_ai", "train", "--model", "x", "--config"];
        argv.push(path.to_str().unwrap());
        argv.extend(flags);
        match parse_from(argv).unwrap().command {
            Command::Train(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn either_flag_of_a_pair_on_the_command_line_beats_either_key() {
        // The file's `X` lost only to `--X`, so `--no-X` was overridden by `X: true`.
        let a = train(
            "mask_prompt: true\nsave_best: true\n",
            &["--no-mask-prompt", "--no-save-best"],
        );
        assert!(!a.data.mask_prompt && !a.output.save_best);
        let a = train("no_mask_prompt: true\n", &["--mask-prompt"]);
        assert!(a.data.mask_prompt);
        // Distrust has three states (unset: on for scored data); each flag wins over each key.
        let a = train("no_distrust: true\n", &["--distrust"]);
        assert!(a.distrust.distrust && !a.distrust.no_distrust);
        let a = train("distrust: true\n", &["--no-distrust"]);
        assert!(!a.distrust.distrust && a.distrust.no_distrust);
    }

    #[test]
    fn a_false_key_is_its_no_flag() {
        let a = train("distrust: false\nmask_prompt: false\n", &[]);
        assert!(a.distrust.no_distrust && !a.distrust.distrust && !a.data.mask_prompt);
        let a = train("no_distrust: false\nno_save_best: true\n", &[]);
        assert!(a.distrust.distrust && !a.distrust.no_distrust && !a.output.save_best);
        let a = train("", &[]);
        assert!(!a.distrust.distrust && !a.distrust.no_distrust && a.data.mask_prompt);
    }

    /// The error `train --config FILE` holding `yaml` gives ("" when it parses).
    fn refusal(yaml: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.yaml");
        std::fs::write(&path, yaml).unwrap();
        let argv = [
            "your_ai",
            "train",
            "--model",
            "x",
            "--config",
            path.to_str().unwrap(),
        ];
        parse_from(argv)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn nan_and_infinity_are_refused_naming_the_key() {
        for yaml in [
            "epochs: .nan\n",
            "max_memory: .inf\n",
            "lora-alpha: -.inf\n",
        ] {
            let key = yaml.split(':').next().unwrap();
            let e = refusal(yaml);
            assert!(
                e.contains(&format!("`{key}`: not a finite number")),
                "{yaml}: {e}"
            );
        }
    }

    #[test]
    fn the_model_is_given_on_the_command_line() {
        let e = refusal("model: llama-8b\nlora_rank: 4\n");
        assert!(
            e.contains("`model`: give the model on the command line"),
            "{e}"
        );
        assert_eq!(refusal("lora_rank: 4\n"), "");
    }

    #[test]
    fn a_number_is_checked_by_its_flags_own_parser_naming_file_and_key() {
        for (yaml, why) in [
            (
                "max_memory: 0\n",
                "give the size in GB as a positive number",
            ),
            (
                "max-memory: -2.5\n",
                "give the size in GB as a positive number",
            ),
            (
                "keep_activations: -1\n",
                "expected auto, all, none or a number of blocks",
            ),
        ] {
            let key = yaml.split(':').next().unwrap();
            let e = refusal(yaml);
            assert!(
                e.contains("run.yaml: `") && e.contains(&format!("`{key}`: ")),
                "{e}"
            );
            assert!(e.contains(why), "{yaml}: {e}");
        }
        assert_eq!(
            refusal("keep_activations: 3\nmax_memory: 0.5\nlearning_rate: 1e-4\n"),
            ""
        );
    }
}
