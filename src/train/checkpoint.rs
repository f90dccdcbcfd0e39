//! Checkpoints that a run resumes from exactly: the PEFT adapter, the AdamW moments, the step,
//! the data cursor and the resolved configuration, with a checksum of every file.
//!
//! A checkpoint is written into a temporary directory, each file fsynced, then renamed to
//! `checkpoints/step-N`; `checkpoints/latest` names the newest and is replaced by rename too.
//! A crash at any point leaves every `step-N` directory complete or absent.

use crate::error::{Error, Result};
use crate::model::lora::Adapter;
use crate::train::config::TrainConfig;
use crate::train::optimizer::AdamW;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Settings a resumed run may change: they do not alter what is computed up to the checkpoint.
const HARMLESS: &[&str] = &[
    "steps",
    "epochs",
    "steps_per_eval",
    "val_batches",
    "save_every",
    "keep_checkpoints",
    "metrics_file",
    "test",
    "save_best",
    "memory_report_interval",
    "profile",
    "output",
    "data",
    // Same results, different memory or speed.
    "keep_activations",
    "keep_blocks",
    "memory_budget",
    "reload_interval",
];

/// Everything besides tensors that the loop needs to continue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub format_version: u32,
    pub step: usize,
    pub optimizer_t: u64,
    pub epoch: u64,
    pub position: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub skipped: usize,
    pub nonfinite: usize,
    pub first_val: Option<f64>,
    pub last_val: Option<f64>,
    pub best_val: Option<(usize, f64)>,
    /// SHA-256 of the training (and validation) data the run saw.
    pub data_sha256: String,
    pub config: serde_json::Value,
    /// SHA-256 of each other file of the checkpoint.
    pub checksums: BTreeMap<String, String>,
}

/// A checkpoint read back and verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub moments: (Vec<Tensor>, Vec<Tensor>),
}

/// Streamed, so hashing a large optimizer file does not hold it in memory.
fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("read", path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io("read", path, e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// SHA-256 over the given files' contents, in order.
pub fn data_fingerprint(files: &[&Path]) -> Result<String> {
    let mut h = Sha256::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| Error::io("read", f, e))?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("sync", path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_all().map_err(|e| Error::io("sync", path, e))
}

/// Writes `checkpoints/step-N` atomically and points `latest` at it; keeps the newest `keep`.
pub fn save(
    root: &Path,
    adapter: &Adapter,
    opt: &AdamW,
    mut state: TrainerState,
    config: &TrainConfig,
    keep: usize,
) -> Result<PathBuf> {
    let dir = root.join(format!("step-{}", state.step));
    std::fs::create_dir_all(root).map_err(|e| Error::io("create", root, e))?;
    // Leftovers of a save that a crash cut short (never complete, never a step-N).
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step-") || name.starts_with(".latest.tmp-") {
                let _ =
                    std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
    }
    let tmp = root.join(format!(".step-{}.tmp-{}", state.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        adapter.save_peft(&tmp, &config.model)?;
        let mut moments = HashMap::new();
        for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
            moments.insert(format!("m.{i}"), m.clone());
            moments.insert(format!("v.{i}"), v.clone());
        }
        let opt_path = tmp.join(OPTIMIZER_FILE);
        candle_core::safetensors::save(&moments, &opt_path)
            .map_err(|e| Error::Usage(format!("cannot write {}: {e}", opt_path.display())))?;
        let cfg_json = serde_json::to_vec_pretty(config).unwrap_or_default();
        write_synced(&tmp.join("train_config.json"), &cfg_json)?;
        for name in [
            "adapter_model.safetensors",
            "adapter_config.json",
            OPTIMIZER_FILE,
            "train_config.json",
        ] {
            let p = tmp.join(name);
            sync(&p)?;
            state.checksums.insert(name.to_string(), sha256_file(&p)?);
        }
        // The state file goes last: a directory with a valid state file is complete.
        write_synced(
            &tmp.join(STATE_FILE),
            &serde_json::to_vec_pretty(&state).unwrap_or_default(),
        )?;
        sync(&tmp)?;
        replace_dir(&tmp, &dir)?;
        sync(root)?;
        let latest_tmp = root.join(format!(".latest.tmp-{}", std::process::id()));
        write_synced(&latest_tmp, format!("step-{}\n", state.step).as_bytes())?;
        std::fs::rename(&latest_tmp, root.join("latest"))
            .map_err(|e| Error::io("update", root.join("latest"), e))?;
        sync(root)
    })();
    if let Err(e) = result {
        // The previous checkpoints are untouched; only the partial one goes.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    prune(root, keep);
    Ok(dir)
}

/// Step numbers of the complete-looking checkpoints under `root`, ascending.
pub fn list(root: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

fn prune(root: &Path, keep: usize) {
    let steps = list(root);
    if keep == 0 || steps.len() <= keep {
        return;
    }
    for s in &steps[..steps.len() - keep] {
        let _ = discard(&root.join(format!("step-{s}")));
    }
}

/// Puts the complete directory `tmp` in the place of `dir`. Where `dir` exists (a checkpoint
/// rewritten after resuming from an earlier one, `best/`), the two are swapped in one step
/// (Linux `renameat2(RENAME_EXCHANGE)`) so that a crash never leaves `dir` missing; the old
/// content, now under the hidden name `tmp`, is then deleted. Where the filesystem cannot swap,
/// the old one is moved aside first and deleted after: a crash in between leaves `dir` absent
/// and the old content under a hidden name.
pub(crate) fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        if exchange(tmp, dir).is_ok() {
            let _ = std::fs::remove_dir_all(tmp);
            return Ok(());
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = dir.with_file_name(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| Error::io("move aside", dir, e))?;
        std::fs::rename(tmp, dir).map_err(|e| Error::io("rename into place", dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        return Ok(());
    }
    std::fs::rename(tmp, dir).map_err(|e| Error::io("rename into place", dir, e))
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both arguments are NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Removes a checkpoint directory without ever leaving a half-deleted `step-N`: it is first
/// renamed to a hidden name (atomic), then deleted; a crash in between leaves only the hidden
/// leftover, which the next save clears.
fn discard(dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = dir.with_file_name(format!(".{name}.trash-{}", std::process::id()));
    std::fs::rename(dir, &trash).map_err(|e| Error::io("move aside", dir, e))?;
    std::fs::remove_dir_all(&trash).map_err(|e| Error::io("remove", &trash, e))
}

/// The checkpoint `--resume` means: `PATH` itself, or the latest under `<output>/checkpoints`.
pub fn locate(output: &Path, given: &str) -> Result<PathBuf> {
    if !given.is_empty() {
        let p = PathBuf::from(given);
        if p.join(STATE_FILE).is_file() {
            return Ok(p);
        }
        // An output directory: its latest checkpoint.
        if p.join("checkpoints").is_dir() {
            return locate(&p, "");
        }
        return Err(Error::Usage(format!(
            "--resume {}: not a checkpoint directory (no {STATE_FILE}) and not an output directory with checkpoints/",
            p.display()
        )));
    }
    let root = output.join("checkpoints");
    let latest = std::fs::read_to_string(root.join("latest")).ok();
    let dir = match latest.map(|l| root.join(l.trim())) {
        Some(d) if d.join(STATE_FILE).is_file() => d,
        _ => match list(&root).last() {
            Some(s) => root.join(format!("step-{s}")),
            None => {
                return Err(Error::Usage(format!(
                    "--resume: no checkpoint in {}; start the run without --resume",
                    root.display()
                )))
            }
        },
    };
    Ok(dir)
}

/// Reads a checkpoint and checks every file against its checksum.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let corrupt = |why: String| {
        let previous = dir
            .parent()
            .map(list)
            .unwrap_or_default()
            .into_iter()
            .rfind(|s| {
                format!("step-{s}") != dir.file_name().and_then(|n| n.to_str()).unwrap_or("")
            });
        let hint = match previous {
            Some(s) => format!(
                "; the previous checkpoint is {}: resume with --resume {}",
                s,
                dir.with_file_name(format!("step-{s}")).display()
            ),
            None => String::new(),
        };
        Error::Usage(format!(
            "checkpoint {} is damaged: {why}{hint}",
            dir.display()
        ))
    };
    let state_path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&state_path).map_err(|e| corrupt(format!("{STATE_FILE}: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| corrupt(format!("{STATE_FILE} is not valid: {e}")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(Error::Usage(format!(
            "checkpoint {} has format version {}; this your_ai reads version {FORMAT_VERSION}",
            dir.display(),
            state.format_version
        )));
    }
    for (name, want) in &state.checksums {
        let got = sha256_file(&dir.join(name)).map_err(|e| corrupt(e.to_string()))?;
        if &got != want {
            return Err(corrupt(format!("{name} does not match its checksum")));
        }
    }
    let tensors = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), device)
        .map_err(|e| corrupt(format!("{OPTIMIZER_FILE}: {e}")))?;
    let n = tensors.len() / 2;
    let mut m = Vec::with_capacity(n);
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let get = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .ok_or_else(|| corrupt(format!("{OPTIMIZER_FILE} lacks {k}")))
        };
        m.push(get(format!("m.{i}"))?);
        v.push(get(format!("v.{i}"))?);
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        moments: (m, v),
    })
}

/// Settings that differ between the checkpoint's run and this one, as `key: was → now`,
/// split into (refused, allowed).
pub fn differences(saved: &serde_json::Value, now: &TrainConfig) -> (Vec<String>, Vec<String>) {
    let now = serde_json::to_value(now).unwrap_or_default();
    let (mut refused, mut allowed) = (vec![], vec![]);
    if let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) {
        for (k, was) in a {
            let is = b.get(k).cloned().unwrap_or(serde_json::Value::Null);
            if &is != was {
                let line = format!("{k}: {was} → {is}");
                if HARMLESS.contains(&k.as_str()) {
                    allowed.push(line);
                } else {
                    refused.push(line);
                }
            }
        }
    }
    (refused, allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_dir_swaps_an_existing_directory_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("best");
        let tmp = root.path().join(".best.tmp-1");
        for (d, text) in [(&dir, "old"), (&tmp, "new")] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("a"), text).unwrap();
        }
        replace_dir(&tmp, &dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "new");
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["best"], "the old content is deleted");
        // Into an empty place: a plain rename.
        let tmp2 = root.path().join(".c.tmp-1");
        std::fs::create_dir_all(&tmp2).unwrap();
        replace_dir(&tmp2, &root.path().join("c")).unwrap();
        assert!(root.path().join("c").is_dir() && !tmp2.exists());
    }
}
