//! Checkpoints that a run resumes from exactly: the PEFT adapter, the AdamW moments, the step,
//! the data cursor and the resolved configuration, with a checksum of every file.
//!
//! A checkpoint is written into a temporary directory, each file fsynced, then renamed to
//! `checkpoints/step-N`; `checkpoints/latest` names the newest and is replaced by rename too.
//! A crash at any point leaves every `step-N` directory complete or absent.

use crate::engine::OptimizerState;
use crate::error::{Error, Result};
use crate::model::lora::Adapter;
use crate::model::ModelConfig;
use crate::train::config::TrainConfig;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// 2: every file, the state file included, is listed in `SHA256SUMS`.
pub const FORMAT_VERSION: u32 = 2;
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// SHA-256 of every other file, in `sha256sum` format (`sha256sum -c SHA256SUMS` checks it).
/// Written last: a directory whose sums check out is complete. It lives outside the state file,
/// so an edit of the state (its step, its own list of checksums) breaks a sum.
const SUMS_FILE: &str = "SHA256SUMS";
/// The files a checkpoint must have, each in `SUMS_FILE`.
const FILES: [&str; 5] = [
    "adapter_model.safetensors",
    "adapter_config.json",
    OPTIMIZER_FILE,
    "train_config.json",
    STATE_FILE,
];

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
    "max_memory",
    "auto_fit",
    // Where it runs, not what it computes (the dtype, which does change it, is compared).
    "device",
    // The same step to rounding (the equivalence tests), noted as such.
    "engine",
    // The steps asked for; `steps`, the resolved count, is listed above.
    "max_steps",
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
    /// A stop cut this step's validation short: the resumed run does it before training on.
    /// (Absent from checkpoints written before it was recorded.)
    #[serde(default)]
    pub eval_pending: bool,
    /// The last step whose validation ran to its end: a checkpoint of the run's last step
    /// without it (the run shortened to it on resume) has its final validation still to do.
    /// (Absent from checkpoints written before it was recorded.)
    #[serde(default)]
    pub last_eval_step: Option<usize>,
    /// SHA-256 of the training (and validation) data the run saw.
    pub data_sha256: String,
    pub config: serde_json::Value,
    /// SHA-256 of each other file of the checkpoint.
    pub checksums: BTreeMap<String, String>,
}

/// A checkpoint read back and verified; its tensors on the host.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub optimizer: OptimizerState,
}

impl Loaded {
    /// The checkpoint's adapter, on the host.
    pub fn adapter(&self, model: &ModelConfig) -> Result<Adapter> {
        Ok(Adapter::load_peft(&self.dir, model, &Device::Cpu)?)
    }
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

/// A fingerprint of the model's files (a GGUF file; a directory's safetensors, config and
/// tokenizer): each one's name, size and sampled content (its whole when small, else its
/// first and last MiB and 64 blocks across it). Reading a few MB of a 16 GB model, it catches
/// a re-download of other weights, a re-quantization or damage, where the path alone did not.
pub fn model_fingerprint(source: &crate::model::source::ModelSource) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    const SAMPLE: u64 = 64 << 10;
    const END: u64 = 1 << 20;
    let files: Vec<PathBuf> = match source {
        crate::model::source::ModelSource::Gguf(p) => vec![p.clone()],
        crate::model::source::ModelSource::HfDir(dir) => {
            let read = std::fs::read_dir(dir).map_err(|e| Error::io("read", dir, e))?;
            let mut files: Vec<PathBuf> = read
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    name.ends_with(".safetensors")
                        || ["config.json", "tokenizer.json", "tokenizer_config.json"]
                            .contains(&name)
                })
                .collect();
            files.sort();
            files
        }
    };
    let mut h = Sha256::new();
    for path in &files {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io("read", path, e))?;
        let size = f.metadata().map_err(|e| Error::io("read", path, e))?.len();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        h.update(name.as_bytes());
        h.update(size.to_le_bytes());
        let spans: Vec<(u64, u64)> = if size <= 4 * END {
            vec![(0, size)]
        } else {
            let step = (size - SAMPLE) / 63;
            let mut s = vec![(0, END), (size - END, END)];
            s.extend((0..64).map(|i| (i * step, SAMPLE)));
            s
        };
        let mut buf = vec![];
        for (at, len) in spans {
            buf.resize(len as usize, 0);
            f.seek(SeekFrom::Start(at))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| Error::io("read", path, e))?;
            h.update(&buf);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

fn sync(path: &Path) -> Result<()> {
    crate::io::sync_path(path).map_err(|e| Error::io("sync", path, e))
}

/// Writes `checkpoints/step-N` atomically and points `latest` at it; keeps the newest `keep`.
pub fn save(
    root: &Path,
    adapter: &Adapter,
    opt: &OptimizerState,
    mut state: TrainerState,
    config: &TrainConfig,
    keep: usize,
) -> Result<PathBuf> {
    let dir = root.join(format!("step-{}", state.step));
    std::fs::create_dir_all(root).map_err(|e| Error::io("create", root, e))?;
    // Leftovers of a save that a crash cut short (never complete, never a step-N).
    crate::io::clear_leftovers(root);
    // Dropped on an error, the partial directory goes; earlier checkpoints are untouched.
    let staged = crate::io::Staged::replacing(&dir)?;
    let tmp = &staged.tmp;
    std::fs::create_dir_all(tmp).map_err(|e| Error::io("create", tmp, e))?;
    adapter.save_peft(tmp, &config.model.model)?;
    let mut moments = HashMap::new();
    for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
        moments.insert(format!("m.{i}"), m.clone());
        moments.insert(format!("v.{i}"), v.clone());
    }
    let opt_path = tmp.join(OPTIMIZER_FILE);
    crate::io::tensors::save_safetensors(&moments, &opt_path)
        .map_err(|e| Error::io("write", &opt_path, std::io::Error::other(e)))?;
    let cfg_json = serde_json::to_vec_pretty(config).unwrap_or_default();
    crate::io::write_synced(&tmp.join("train_config.json"), &cfg_json)?;
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
    crate::io::write_synced(
        &tmp.join(STATE_FILE),
        &serde_json::to_vec_pretty(&state).unwrap_or_default(),
    )?;
    let mut sums = String::new();
    for name in FILES {
        sums.push_str(&format!("{}  {name}\n", sha256_file(&tmp.join(name))?));
    }
    crate::io::write_synced(&tmp.join(SUMS_FILE), sums.as_bytes())?;
    staged.commit()?;
    crate::io::write_file(
        &root.join("latest"),
        format!("step-{}\n", state.step).as_bytes(),
    )?;
    prune(root, keep, state.step);
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

/// Keeps the `keep` newest checkpoints up to `written`, the one just saved (a later one is not
/// this run's, and must not push it out).
fn prune(root: &Path, keep: usize, written: usize) {
    let mut steps = list(root);
    steps.retain(|&s| s <= written);
    if keep == 0 || steps.len() <= keep {
        return;
    }
    for s in &steps[..steps.len() - keep] {
        let _ = crate::io::discard(&root.join(format!("step-{s}")));
    }
}

/// The checkpoint `--resume` means: `PATH` itself, or the latest under `<output>/checkpoints`
/// (None when the output has none yet: a run stopped before its first checkpoint).
pub fn locate(output: &Path, given: &str) -> Result<Option<PathBuf>> {
    if !given.is_empty() {
        let p = PathBuf::from(given);
        if p.join(STATE_FILE).is_file() {
            return Ok(Some(p));
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
    let newest = list(&root).last().map(|s| root.join(format!("step-{s}")));
    let latest = std::fs::read_to_string(root.join("latest")).ok();
    // `latest` names a checkpoint beside it (`step-N`), never a path elsewhere.
    let named = latest.as_deref().map(str::trim).map(|l| {
        let inside = l
            .strip_prefix("step-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        (l.to_string(), inside.then(|| root.join(l)))
    });
    // The newest: a step-N is complete once it is there (renamed in whole), and `latest` is
    // one behind when a kill came between the rename and its update.
    let Some(newest) = newest else {
        return Ok(None);
    };
    match named {
        Some((_, Some(d))) if d.join(STATE_FILE).is_file() => {}
        Some((l, _)) => eprintln!(
            "note: {} names {l:?}, which is not a checkpoint there; resuming from {}, the newest one",
            root.join("latest").display(),
            newest.display()
        ),
        None => {}
    }
    Ok(Some(newest))
}

/// Reads a checkpoint and checks every file against its checksum.
pub fn load(dir: &Path) -> Result<Loaded> {
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
    let version_error = |v: u32| {
        Error::Usage(format!(
            "checkpoint {} has format version {v}; this your_ai reads version {FORMAT_VERSION}",
            dir.display()
        ))
    };
    // Every file against its sum first: nothing unverified is parsed.
    let sums = match std::fs::read_to_string(dir.join(SUMS_FILE)) {
        Ok(s) => s,
        Err(e) => {
            // An older format had no sums file: say so rather than "damaged".
            let older = std::fs::read_to_string(dir.join(STATE_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["format_version"].as_u64())
                .filter(|&v| v < FORMAT_VERSION as u64);
            return Err(match older {
                Some(v) => version_error(v as u32),
                None => corrupt(format!("{SUMS_FILE}: {e}")),
            });
        }
    };
    let listed: BTreeMap<&str, &str> = sums
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, name)| (name.trim(), sum.trim()))
        .collect();
    for name in FILES {
        let want = listed
            .get(name)
            .ok_or_else(|| corrupt(format!("{SUMS_FILE} does not list {name}")))?;
        let got = sha256_file(&dir.join(name)).map_err(|e| corrupt(e.to_string()))?;
        if &got != want {
            return Err(corrupt(format!("{name} does not match its checksum")));
        }
    }
    let state_path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&state_path).map_err(|e| corrupt(format!("{STATE_FILE}: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| corrupt(format!("{STATE_FILE} is not valid: {e}")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(version_error(state.format_version));
    }
    let tensors = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &Device::Cpu)
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
        optimizer: OptimizerState {
            t: state.optimizer_t,
            m,
            v,
        },
        state,
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
                let line = match k.as_str() {
                    "model_fingerprint" => "model: its files changed since the checkpoint (the \
                                            same path holds other weights or tokenizer)"
                        .to_string(),
                    "engine" => format!(
                        "engine: {was} → {is}; the engines agree to about 1e-4, so the losses \
                         will differ from the uninterrupted run's in the last digits"
                    ),
                    _ => format!("{k}: {was} → {is}"),
                };
                if HARMLESS.contains(&k.as_str()) {
                    allowed.push(line);
                } else {
                    refused.push(line);
                }
            }
        }
        allowed.extend(unrecorded_weights_dtype(a, b));
    }
    (refused, allowed)
}

/// The note for a checkpoint of an earlier version, which did not record the weights' dtype:
/// they were held in the dtype computed in (f32 on the CPU under auto), where now a bf16
/// checkpoint's stay bf16. The values are the same, so the run goes on, its losses equal to
/// the last digits rather than bit for bit.
fn unrecorded_weights_dtype(
    saved: &serde_json::Map<String, serde_json::Value>,
    now: &serde_json::Map<String, serde_json::Value>,
) -> Option<String> {
    let is = now.get("weights_dtype")?;
    (!saved.contains_key("weights_dtype") && is != "f32").then(|| {
        format!(
            "weights_dtype: not recorded (an earlier version's checkpoint) → {is}; the losses \
             may differ from the uninterrupted run's in the last digits"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unrecorded_weights_dtype_is_noted_where_it_now_differs_from_f32() {
        let map = |v: serde_json::Value| v.as_object().cloned().unwrap();
        let old = map(json!({"dtype": "auto"}));
        let bf16 = map(json!({"dtype": "auto", "weights_dtype": "bf16"}));
        let f32 = map(json!({"dtype": "auto", "weights_dtype": "f32"}));
        assert!(unrecorded_weights_dtype(&old, &bf16).is_some_and(|n| n.contains("bf16")));
        assert_eq!(unrecorded_weights_dtype(&old, &f32), None);
        // Recorded: compared like any other setting, not noted.
        assert_eq!(unrecorded_weights_dtype(&f32, &bf16), None);
    }
}
