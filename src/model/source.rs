//! Turns what the user passed to `--model` into files on disk: a GGUF file, a Hugging Face model
//! directory, an alias such as `llama-8b`, or an `org/name` repository id, looked up in the local
//! Hugging Face cache (honouring `HF_HUB_CACHE` / `HF_HOME` and the snapshot `refs/main` names)
//! and downloaded when the network allows.

use std::path::{Path, PathBuf};

/// Short names for the models people fine-tune most with this tool.
pub const ALIASES: &[(&str, &str)] = &[
    (
        "llama-8b",
        "mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated",
    ),
    ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ("dolphin-8b", "cognitivecomputations/dolphin-2.9-llama3-8b"),
    ("hermes-mistral-7b", "NousResearch/Hermes-2-Pro-Mistral-7B"),
    (
        "r1-distill-14b",
        "huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2",
    ),
    ("hermes-70b", "NousResearch/Hermes-3-Llama-3.1-70B"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer files).
    HfDir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("model path {} does not exist", path.display())]
    NoSuchPath { path: PathBuf },
    #[error("{}: no config.json; a Hugging Face model directory needs config.json, the safetensors weights and tokenizer.json (or pass a .gguf file)", dir.display())]
    NoConfig { dir: PathBuf },
    #[error(
        "unknown model `{name}`: not a file, a directory, an alias or an org/name repository id. \
         Aliases: {}",
        ALIASES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
    )]
    Unknown { name: String },
    #[error(
        "model `{repo}` is not in the local Hugging Face cache and could not be downloaded ({reason}). \
         Looked in {}. Download it on a machine with network access (for example \
         `huggingface-cli download {repo}`) and copy the cache there, or pass a local model \
         directory or .gguf file to --model",
        looked.display()
    )]
    NotCached {
        repo: String,
        looked: PathBuf,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    BrokenCache { path: PathBuf, reason: String },
}

/// The Hugging Face hub cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

pub fn alias_repo(name: &str) -> Option<&'static str> {
    ALIASES.iter().find(|(a, _)| *a == name).map(|(_, r)| *r)
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The snapshot directory that `refs/main` names for `repo` in `cache`, if present.
pub fn cached_snapshot(cache: &Path, repo: &str) -> Result<Option<PathBuf>, SourceError> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Ok(None);
    }
    let refs = repo_dir.join("refs").join("main");
    let Ok(commit) = std::fs::read_to_string(&refs) else {
        return Ok(None);
    };
    let commit = commit.trim();
    if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(SourceError::BrokenCache {
            path: refs,
            reason: "refs/main does not hold a commit hash".into(),
        });
    }
    let snap = repo_dir.join("snapshots").join(commit);
    if !snap.join("config.json").is_file() {
        return Ok(None);
    }
    Ok(Some(snap))
}

/// The base model as an adapter names it, in PEFT's `base_model_name_or_path` and `revision`:
/// a repository id where there is one (an alias's, or that of a Hugging Face cache snapshot,
/// with its commit), so PEFT, llama.cpp's converter and other machines find the model; else a
/// local path made absolute (they read it from wherever they run).
#[derive(Debug, PartialEq, Eq)]
pub struct AdapterBase {
    pub name: String,
    pub revision: Option<String>,
}

impl AdapterBase {
    pub fn of(model: &str) -> Self {
        Self::in_cache(model, &hf_cache_dir())
    }

    /// As [`AdapterBase::of`], with `cache` as the Hugging Face cache.
    fn in_cache(model: &str, cache: &Path) -> Self {
        // The snapshot a repository id resolves to here, with its commit.
        let resolved = |repo: &str| {
            let snap = cached_snapshot(cache, repo).ok().flatten()?;
            let commit = snap.file_name()?.to_str()?.to_string();
            Some((snap.canonicalize().ok()?, commit))
        };
        if let Ok(path) = std::fs::canonicalize(model) {
            // Named by its repository only where the id finds this very snapshot again (the
            // cache this tool and huggingface_hub read, at refs/main): `eval` or `fuse`
            // without --model then loads the weights the adapter was trained on.
            let found = snapshot_repo(&path).and_then(|repo| Some((resolved(&repo)?, repo)));
            return match found {
                Some(((snap, commit), repo)) if snap == path => Self {
                    name: repo,
                    revision: Some(commit),
                },
                _ => Self {
                    name: path.to_string_lossy().into_owned(),
                    revision: None,
                },
            };
        }
        let name = alias_repo(model).unwrap_or(model);
        Self {
            name: name.to_string(),
            revision: looks_like_repo_id(name)
                .then(|| resolved(name).map(|(_, c)| c))
                .flatten(),
        }
    }
}

/// The repository id of a Hugging Face cache snapshot directory
/// (`…/models--org--name/snapshots/<commit>`).
fn snapshot_repo(dir: &Path) -> Option<String> {
    let snapshots = dir.parent()?;
    if snapshots.file_name()? != "snapshots" || !dir.is_dir() {
        return None;
    }
    let folder = snapshots.parent()?.file_name()?.to_str()?;
    // The cache writes `/` as `--`, which a repository id cannot hold.
    let (org, name) = folder.strip_prefix("models--")?.split_once("--")?;
    let repo = format!("{org}/{name}");
    looks_like_repo_id(&repo).then_some(repo)
}

/// Resolves `--model` to local files, downloading when needed and allowed.
pub fn resolve(spec: &str) -> Result<ModelSource, SourceError> {
    let path = Path::new(spec);
    if path.exists() {
        return local(path);
    }
    let repo = match alias_repo(spec) {
        Some(r) => r.to_string(),
        None if looks_like_repo_id(spec) && !spec.ends_with(".gguf") => spec.to_string(),
        None => {
            let path_like = spec.contains(std::path::MAIN_SEPARATOR)
                || spec.starts_with('.')
                || spec.ends_with(".gguf");
            return Err(if path_like {
                SourceError::NoSuchPath {
                    path: path.to_path_buf(),
                }
            } else {
                SourceError::Unknown {
                    name: spec.to_string(),
                }
            });
        }
    };
    let cache = hf_cache_dir();
    if let Some(snap) = cached_snapshot(&cache, &repo)? {
        return Ok(ModelSource::HfDir(snap));
    }
    let reason = match download(&repo, &cache) {
        Ok(dir) => return Ok(ModelSource::HfDir(dir)),
        Err(reason) => reason,
    };
    Err(SourceError::NotCached {
        repo,
        looked: cache,
        reason,
    })
}

fn local(path: &Path) -> Result<ModelSource, SourceError> {
    if path.is_file() {
        return Ok(ModelSource::Gguf(path.to_path_buf()));
    }
    if path.join("config.json").is_file() {
        return Ok(ModelSource::HfDir(path.to_path_buf()));
    }
    // A directory holding exactly one GGUF file and no config.json: use that file.
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect()
        })
        .unwrap_or_default();
    if ggufs.len() == 1 {
        return Ok(ModelSource::Gguf(ggufs[0].clone()));
    }
    Err(SourceError::NoConfig {
        dir: path.to_path_buf(),
    })
}

/// Fetches a repository's config, tokenizer and safetensors weights into the cache.
fn download(repo: &str, cache: &Path) -> Result<PathBuf, String> {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Err("HF_HUB_OFFLINE is set".into());
    }
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let r = api.model(repo.to_string());
    let config = r.get("config.json").map_err(|e| e.to_string())?;
    r.get("tokenizer.json").map_err(|e| e.to_string())?;
    for optional in [
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let _ = r.get(optional);
    }
    match r.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let mut shards: Vec<&str> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                r.get(s).map_err(|e| e.to_string())?;
            }
        }
        Err(_) => {
            r.get("model.safetensors").map_err(|e| e.to_string())?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Whether an alias's repository is in the local cache.
pub fn is_cached(repo: &str) -> bool {
    matches!(cached_snapshot(&hf_cache_dir(), repo), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_aliases() {
        assert!(looks_like_repo_id("meta-llama/Llama-3.1-8B-Instruct"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id("llama-8b"));
        assert_eq!(
            alias_repo("llama-8b"),
            Some("mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated")
        );
        // An adapter names an alias's repository (PEFT and llama.cpp know no aliases).
        let named = AdapterBase::in_cache("llama-8b", Path::new("no-such-cache"));
        assert_eq!(
            named.name,
            "mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated"
        );
        assert_eq!(named.revision, None);
    }

    #[test]
    fn cache_uses_the_snapshot_refs_main_names() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--m");
        for commit in ["aaa111", "bbb222"] {
            let s = repo.join("snapshots").join(commit);
            std::fs::create_dir_all(&s).unwrap();
            std::fs::write(s.join("config.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "bbb222\n").unwrap();
        let snap = cached_snapshot(tmp.path(), "org/m").unwrap().unwrap();
        assert!(snap.ends_with("snapshots/bbb222"));
        std::fs::write(repo.join("refs").join("main"), "aaa111").unwrap();
        let snap = cached_snapshot(tmp.path(), "org/m").unwrap().unwrap();
        assert!(snap.ends_with("snapshots/aaa111"));
        // An adapter names the snapshot refs/main names by its repository and commit, the
        // same repository by its id, and anything else by its absolute path: another snapshot
        // (the id would find other weights), a file in one, or a snapshot of another cache.
        let named = |m: &Path, cache: &Path| {
            let b = AdapterBase::in_cache(m.to_str().unwrap(), cache);
            (b.name, b.revision)
        };
        let absolute = |p: &Path| (p.canonicalize().unwrap().to_str().unwrap().into(), None);
        let at = |c: &str| Some(c.to_string());
        assert_eq!(named(&snap, tmp.path()), ("org/m".into(), at("aaa111")));
        assert_eq!(
            named(Path::new("org/m"), tmp.path()),
            ("org/m".into(), at("aaa111"))
        );
        let other = repo.join("snapshots/bbb222");
        assert_eq!(named(&other, tmp.path()), absolute(&other));
        let file = snap.join("config.json");
        assert_eq!(named(&file, tmp.path()), absolute(&file));
        assert_eq!(named(&snap, &tmp.path().join("elsewhere")), absolute(&snap));
        assert!(cached_snapshot(tmp.path(), "org/other").unwrap().is_none());
    }
}
