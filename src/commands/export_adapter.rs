//! `your_ai export-adapter`: a PEFT adapter as a llama.cpp LoRA GGUF.

use crate::cli::ExportAdapterArgs;
use crate::error::{Error, Result};
use crate::export::adapter_gguf;
use crate::export::merge::Base;
use crate::io::Staged;
use crate::model::lora::{Adapter, AdapterError};
use candle_core::Device;

pub fn run(args: ExportAdapterArgs) -> Result<()> {
    super::fuse::check_adapter_dir(&args.adapter)?;
    let (model, from_config) = match &args.model {
        Some(m) => (m.clone(), false),
        None => (base_from_config(&args.adapter)?, true),
    };
    let inputs = [
        ("--adapter", args.adapter.as_path()),
        ("--model", std::path::Path::new(&model)),
    ];
    let staged = Staged::new(&args.output, args.force, "--output", false, &inputs)?;
    // The base's config gives the shapes to check and llama.cpp's q/k head counts.
    let base = Base::open(&model).map_err(|e| {
        if !from_config {
            return e;
        }
        Error::Usage(format!(
            "{e}\n(the base model named by {}'s base_model_name_or_path; pass --model with \
             the base model)",
            args.adapter.join("adapter_config.json").display()
        ))
    })?;
    let adapter = Adapter::load_peft(&args.adapter, &base.cfg, &Device::Cpu)?;
    adapter_gguf::write(&adapter, &base.cfg, &model, &staged.tmp)?;
    staged.commit()?;
    println!(
        "wrote {} ({} LoRA pairs, rank {}, alpha {}) for {model}; use it with llama.cpp: --lora {}",
        args.output.display(),
        adapter.iter().count(),
        adapter.cfg.rank,
        adapter.cfg.scale() * adapter.cfg.rank as f64,
        args.output.display()
    );
    Ok(())
}

fn base_from_config(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
    // A damaged file, as `Adapter::load_peft` reports one (exit 1), not a usage error.
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| AdapterError::Invalid {
        path: path.clone(),
        reason: format!("not valid JSON: {e}"),
    })?;
    v.get("base_model_name_or_path")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            Error::Usage(format!(
                "{}: no base_model_name_or_path; pass --model with the base model",
                path.display()
            ))
        })
}
