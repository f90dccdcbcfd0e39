//! The output directory of `train`: locked for the run, and never mixed with or silently
//! replacing what it holds (an earlier run is continued with `--resume` or replaced with
//! `--force`; a user's own files are neither).

use crate::error::{Error, Result};
use crate::io::DirLock;
use crate::train::config::TrainConfig;
use std::path::{Path, PathBuf};

fn usage(msg: String) -> Error {
    Error::Usage(msg)
}

/// What a run writes into its output directory, besides files the user keeps there.
const RUN_OUTPUTS: &[&str] = &[
    "adapter_model.safetensors",
    "adapter_config.json",
    "train_config.json",
    "metrics.jsonl",
    "best",
    "checkpoints",
];

/// What `--resume` found.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Resuming {
    /// Not asked for.
    No,
    /// Asked for, and the output holds no checkpoint: the run starts from the beginning.
    NoCheckpoint,
    /// A checkpoint is continued; `metrics`: where its run wrote its metrics, as recorded;
    /// `at`: the checkpoint's directory and step.
    Checkpoint {
        metrics: Option<PathBuf>,
        at: PathBuf,
        step: usize,
    },
}

/// What a run leaves before its first checkpoint: `--resume` may start such a run again.
const BEFORE_FIRST_CHECKPOINT: &[&str] =
    &["metrics.jsonl", "checkpoints", "train_config.json", "best"];

/// Whether `name`, held in an output, is one of [`BEFORE_FIRST_CHECKPOINT`].
fn restartable(name: &str) -> bool {
    BEFORE_FIRST_CHECKPOINT.contains(&name)
}

/// A checkpoint is continued into `dir` only where nothing there would be mixed with it: the
/// checkpoint's own run, with no later checkpoint (an abandoned continuation, which pruning
/// and a later `--resume` would take for this run's), or an empty directory. Into another run's
/// directory, its adapter, `best/` and metrics were overwritten and its checkpoints mixed in.
fn check_continuation(dir: &Path, at: &Path, step: usize, held: &[String]) -> Result<()> {
    use crate::train::checkpoint;
    let root = dir.join("checkpoints");
    let own_root = at
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    if own_root.is_some() && own_root == root.canonicalize().ok() {
        // A damaged later one is no continuation (`load` names the one before it to resume).
        let later: Vec<String> = checkpoint::list(&root)
            .into_iter()
            .filter(|&s| s > step)
            .map(|s| format!("step-{s}"))
            .filter(|name| checkpoint::load(&root.join(name)).is_ok())
            .collect();
        if !later.is_empty() {
            return Err(usage(format!(
                "--resume {}: {} holds later checkpoints of this run ({}); continuing from an \
                 earlier one would mix the two. Resume from the latest (--resume alone), move \
                 the later ones away, or resume into an empty --output",
                at.display(),
                root.display(),
                later.join(", ")
            )));
        }
        return Ok(());
    }
    // What a continuation killed before its first checkpoint here left may be redone.
    let started_here = held.iter().all(|n| restartable(n)) && checkpoint::list(&root).is_empty();
    if !held.is_empty() && !started_here {
        let mut shown: Vec<&str> = held.iter().map(String::as_str).collect();
        shown.sort_unstable();
        return Err(usage(format!(
            "--resume {}: that checkpoint is another output's, and {} is not empty ({}); \
             continuing it here would overwrite or mix with what is there. Resume into an empty \
             --output, or into the checkpoint's own",
            at.display(),
            dir.display(),
            crate::io::first_few(&shown)
        )));
    }
    Ok(())
}

/// Locks the output directory for this run and makes sure nothing the user has is overwritten:
/// an earlier run there is continued (`--resume`) or replaced (`--force`), never silently
/// mixed with this one; a `--metrics-file` that is not one of ours is never truncated.
/// `--resume` with no checkpoint restarts only a run that was stopped before its first one:
/// a finished run whose checkpoints are gone, or anything else, is refused as without it.
/// An earlier run `--force` replaces stays until [`Claim::replace_earlier`], once the model
/// has loaded: a run that cannot start loses nothing.
pub(super) fn claim_output(cfg: &TrainConfig, resume: &Resuming) -> Result<Claim> {
    let dir = cfg.output_dir();
    let existed = dir.exists();
    let lock = DirLock::acquire(dir, "--output")?;
    let mut claim = check_output(cfg, resume, lock).inspect_err(|_| {
        // Refused: the directory the lock made goes too (remove_dir takes only an empty one).
        if !existed {
            let _ = std::fs::remove_dir(dir);
        }
    })?;
    if !existed {
        claim.made = Some(dir.to_path_buf());
    }
    Ok(claim)
}

/// The output directory, held for this run.
pub(super) struct Claim {
    lock: Option<DirLock>,
    /// The earlier run's outputs, which `--force` replaces (empty otherwise).
    earlier: Vec<PathBuf>,
    /// The directory, where the claim made it: a run that fails before writing anything
    /// (its model does not load) leaves none behind.
    made: Option<PathBuf>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        drop(self.lock.take());
        if let Some(dir) = &self.made {
            // Only an empty one goes.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Claim {
    /// Removes the earlier run's outputs `--force` replaces; anything else stays.
    pub(super) fn replace_earlier(&self) -> Result<()> {
        for p in &self.earlier {
            crate::io::remove(p)?;
        }
        Ok(())
    }
}

/// [`claim_output`]'s checks, holding the lock (released, on an error, before they return).
fn check_output(cfg: &TrainConfig, resume: &Resuming, lock: DirLock) -> Result<Claim> {
    let dir = cfg.output_dir();
    // An adapter a killed run was moving into place is finished; what it left half-written
    // (hidden, never read) goes now, not at its next save.
    match crate::io::file_set::finish_commits(dir) {
        Ok(0) => {}
        Ok(_) => eprintln!(
            "note: {}: finished putting in place the adapter files of a run killed while \
             writing them",
            dir.display()
        ),
        Err(e) => return Err(Error::io("finish writing the adapter in", dir, e)),
    }
    crate::io::clear_leftovers(dir);
    crate::io::clear_leftovers(&dir.join("checkpoints"));
    let held = held_in(dir)?;
    let resuming = match resume {
        Resuming::Checkpoint { at, step, .. } => {
            check_continuation(dir, at, *step, &held)?;
            true
        }
        Resuming::NoCheckpoint if held.iter().all(|n| restartable(n)) => true,
        Resuming::NoCheckpoint => {
            let mut shown: Vec<&String> = held.iter().filter(|n| !restartable(n)).collect();
            shown.sort();
            return Err(usage(format!(
                "--resume: {} has no checkpoint to continue from, and holds an earlier run's \
                 outputs or other files ({}); pass --force (without --resume) to replace that \
                 run, or choose another --output",
                dir.display(),
                crate::io::first_few(&shown),
            )));
        }
        Resuming::No => false,
    };
    let replacing = !held.is_empty() && !resuming;
    if replacing {
        if !cfg.output.force {
            return Err(not_empty(dir, held));
        }
        let foreign: Vec<String> = RUN_OUTPUTS
            .iter()
            .map(|n| dir.join(n))
            .filter(|p| !earlier_runs(p))
            .map(|p| p.display().to_string())
            .collect();
        if !foreign.is_empty() {
            return Err(usage(format!(
                "--force replaces an earlier run's outputs, and {} has the name of one but not \
                 its contents; move it away, or choose another --output",
                foreign.join(", ")
            )));
        }
    }
    let metrics = cfg.metrics_file();
    if metrics.is_dir() {
        return Err(usage(format!(
            "--metrics-file {}: is a directory; name a file",
            metrics.display()
        )));
    }
    // Checked now, not when the trainer creates it: a refusal must come before --force removes.
    let first_existing = metrics
        .parent()
        .into_iter()
        .flat_map(Path::ancestors)
        .find(|p| p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok());
    if let Some(p) = first_existing.filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        return Err(usage(format!(
            "--metrics-file {}: {} is a file, not a directory; choose another path",
            metrics.display(),
            p.display()
        )));
    }
    if metrics.exists() {
        if !is_metrics_file(&metrics) {
            return Err(usage(format!(
                "--metrics-file {}: the file exists and is not a metrics file of your_ai; \
                 choose a new path (it would be overwritten)",
                metrics.display()
            )));
        }
        if !resuming && !cfg.output.force {
            return Err(usage(format!(
                "--metrics-file {}: holds an earlier run's metrics; pass --resume to continue that \
                 run, --force to replace them, or choose another --metrics-file",
                metrics.display()
            )));
        }
        // A resumed run cuts its metrics back to the checkpoint's step: never another run's.
        if let Resuming::Checkpoint { metrics: own, .. } = resume {
            let ours = |p: &Path| same_file(&metrics, p);
            if !ours(&dir.join("metrics.jsonl"))
                && !own.as_deref().is_some_and(ours)
                && !cfg.output.force
            {
                return Err(usage(format!(
                    "--metrics-file {}: holds another run's metrics (the run being resumed wrote \
                     its own to {}), and resuming would cut them back to its checkpoint; leave \
                     --metrics-file out, or name a new file",
                    metrics.display(),
                    own.as_deref()
                        .map_or("its output directory".into(), |p| p.display().to_string())
                )));
            }
        }
    }
    // --force, every check passed: the earlier run's outputs go once the run can start.
    let earlier = match replacing {
        true => RUN_OUTPUTS.iter().map(|n| dir.join(n)).collect(),
        false => vec![],
    };
    Ok(Claim {
        lock: Some(lock),
        earlier,
        made: None,
    })
}

/// Whether `path`, named as one of [`RUN_OUTPUTS`], is absent or what a run of this tool writes
/// there: `--force` removes nothing else (a user's own `checkpoints/` is not an earlier run).
fn earlier_runs(path: &Path) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return true;
    };
    let holds_only = |ours: &dyn Fn(&str) -> bool| {
        std::fs::read_dir(path).is_ok_and(|entries| {
            entries.flatten().all(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with('.') || ours(&name)
            })
        })
    };
    match path.file_name().and_then(|n| n.to_str()) {
        Some("metrics.jsonl") => meta.is_file() && is_metrics_file(path),
        Some("checkpoints") => {
            meta.is_dir()
                && holds_only(&|n| {
                    n == "latest"
                        || n.strip_prefix("step-")
                            .is_some_and(|s| s.parse::<u64>().is_ok())
                })
        }
        Some("best") => meta.is_dir() && holds_only(&|n| ADAPTER_FILES.contains(&n)),
        _ => meta.is_file(),
    }
}

/// What an adapter directory (`best/`) holds.
const ADAPTER_FILES: &[&str] = &[
    "adapter_model.safetensors",
    "adapter_config.json",
    "train_config.json",
    "README.md",
];

/// What `dir` holds besides this tool's lock and half-written leftovers (nothing when it does
/// not exist).
pub(super) fn held_in(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(vec![]);
    }
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io("read", dir, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != DirLock::FILE && !crate::io::is_leftover(n))
        .collect())
}

/// The refusal of an --output that holds something, without --resume or --force.
pub(super) fn not_empty(dir: &Path, mut held: Vec<String>) -> Error {
    held.sort();
    usage(format!(
        "--output {}: the directory is not empty ({}); pass --resume to continue the run \
         there, --force to replace it, or choose another --output",
        dir.display(),
        crate::io::first_few(&held)
    ))
}

/// Whether `a` and `b` name the same file (`a` exists).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Whether `path` is a metrics file this tool wrote: its first line is our start record.
fn is_metrics_file(path: &Path) -> bool {
    use std::io::{BufRead, Read};
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut first = String::new();
    match std::io::BufReader::new(f.take(1 << 20)).read_line(&mut first) {
        Err(_) => false,
        // Empty, or its start record torn (a run killed, or a machine that lost power, as it
        // was written): nothing of anyone's to lose, and it must not block --resume or --force.
        Ok(0) => true,
        Ok(_) if !first.ends_with('\n') => first.starts_with(START_RECORD_OPENS),
        Ok(_) => serde_json::from_str::<serde_json::Value>(&first)
            .is_ok_and(|v| v["type"] == "start" && v.get("memory_budget_bytes").is_some()),
    }
}

/// Whether the run in the output ended at `step`, its last: the adapter is in place and the
/// metrics hold that step's end record (written last, after the test set). A run stopped
/// before it (after its last checkpoint, or while testing) is finished by `--resume`.
pub(super) fn finished(cfg: &TrainConfig, step: usize) -> bool {
    let dir = cfg.output_dir();
    let adapter = ["adapter_model.safetensors", "adapter_config.json"];
    step == cfg.steps
        && adapter.iter().all(|f| dir.join(f).is_file())
        && std::fs::read_to_string(cfg.metrics_file()).is_ok_and(|text| {
            text.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .is_ok_and(|v| v["type"] == "end" && v["step"] == step)
            })
        })
}

/// How a metrics file's first line, the start record, begins (its first key, as written).
const START_RECORD_OPENS: &str = "{\"memory_budget_bytes\":";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_file_is_known_even_when_its_start_record_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let is = |text: &str| {
            let p = dir.path().join("metrics.jsonl");
            std::fs::write(&p, text).unwrap();
            is_metrics_file(&p)
        };
        let start = r#"{"memory_budget_bytes":1,"type":"start","step":0}"#;
        assert!(is(&format!("{start}\n{{\"type\":\"train\"}}\n")));
        // Killed before or while its first line was written: it blocked --resume and --force.
        assert!(is(""));
        assert!(is(&start[..30]));
        // Anyone else's file, whole or not, is not ours.
        assert!(!is("{\"memory_budget_bytes\":1}\n"));
        assert!(!is("{\"loss\": 1.5"));
        assert!(!is("step,loss\n1,2.0\n"));
        assert!(!is_metrics_file(&dir.path().join("absent")));
    }
}
