//! `fuse` as a user runs it, and what the fuse tests read back: for tests/fuse.rs and
//! tests/fuse_refusals.rs.

#![allow(dead_code)]

use super::common::{cli, random_adapter, smollm2};
use std::path::{Path, PathBuf};
use your_ai::model::ModelConfig;
use your_ai::weights::GgufFile;

/// The config of the Hugging Face model directory `dir`.
pub fn hf_config(dir: &Path) -> ModelConfig {
    ModelConfig::from_hf_file(&dir.join("config.json")).unwrap()
}

/// `your_ai eval` loss on `data`, with an adapter when given.
pub fn eval_loss(model: &Path, data: &Path, adapter: Option<&Path>) -> f64 {
    let mut c = cli();
    c.arg("eval")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "eval {}: {stdout}{}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("loss: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub fn fuse(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    cli()
        .arg("fuse")
        .arg("--model")
        .arg(model)
        .arg("--adapter")
        .arg(adapter)
        .arg("--output")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

pub fn fuse_ok(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> String {
    let o = fuse(model, adapter, out, extra);
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "fuse {extra:?}: {s}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    s
}

/// Nothing but `expected` in `dir`: no staging leftovers.
pub fn assert_only(dir: &Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want);
}

/// A random adapter for SmolLM2, B non-zero so that a merge matters.
pub fn smollm2_adapter(dir: &Path) -> PathBuf {
    let g = GgufFile::open(&smollm2()).unwrap();
    random_adapter(&g.config().unwrap(), dir, 0.1, 7);
    dir.to_path_buf()
}
