//! `your_ai fuse`: the adapter merged into the base, written as a Hugging Face directory or a
//! GGUF file; with `--data`, validation loss before and after the merge.

use crate::cli::{flag_name, FuseArgs};
use crate::data::files::{read_jsonl, resolve_files};
use crate::data::Encoder;
use crate::error::{Error, Result};
use crate::export::merge::Base;
use crate::export::{gguf_writer, hf_dir, Format, HfDtype};
use crate::infer::eval::{evaluate, EvalResult};
use crate::io::Staged;
use crate::model::lora::Adapter;
use crate::model::LoadOptions;
use crate::model::LoadedModel;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub fn run(args: FuseArgs) -> Result<()> {
    let format = args.format.unwrap_or_else(|| {
        if args.output.extension().is_some_and(|e| e == "gguf") {
            Format::Gguf
        } else {
            Format::Hf
        }
    });
    if args.max_seq_length < 2 {
        return Err(Error::Usage("--max-seq-length must be at least 2".into()));
    }
    check_adapter_dir(&args.adapter)?;
    let mut inputs = vec![
        ("--adapter", args.adapter.as_path()),
        ("--model", Path::new(&args.model)),
    ];
    inputs.extend(args.data.as_deref().map(|d| ("--data", d)));
    let is_dir = format == Format::Hf;
    let staged = Staged::new(&args.output, args.force, "--output", is_dir, &inputs)?;
    // Ctrl-C stops between tensors, and the partial output (as large as the model) goes.
    crate::runtime::signals::install_for_output();
    // Bad data fails before any weights are written.
    let valid = match &args.data {
        Some(d) => Some(validation_file(d)?),
        None => None,
    };
    let start = Instant::now();
    let base = Base::open(&args.model)?;
    base.check_dequantize(args.dequantize)?;
    if format == Format::Hf {
        hf_dir::check(&base)?;
    }
    let adapter = Adapter::load_peft(&args.adapter, &base.cfg, &Device::Cpu)?;
    let what = match format {
        Format::Hf => {
            let dtype = match args.hf_dtype {
                HfDtype::Auto => hf_dir::auto_dtype(&base),
                HfDtype::F32 => DType::F32,
                HfDtype::F16 => DType::F16,
                HfDtype::Bf16 => DType::BF16,
            };
            hf_dir::write(&base, &adapter, &staged.tmp, dtype, args.max_shard_size)?;
            format!("Hugging Face directory, {}", dtype.as_str())
        }
        Format::Gguf => {
            gguf_writer::write(&base, &adapter, &staged.tmp, args.gguf_type)?;
            format!("GGUF, {}", flag_name(args.gguf_type))
        }
    };
    staged.commit()?;
    println!(
        "fused {} (rank {}, scale {}) into {}: {} ({what}) in {:.1} s",
        args.adapter.display(),
        adapter.cfg.rank,
        adapter.cfg.scale(),
        args.model,
        args.output.display(),
        start.elapsed().as_secs_f64()
    );
    drop(base);
    if let Some(path) = valid {
        let unmerged = {
            let mut m = crate::model::load(&args.model, &LoadOptions::cpu_f32(), None)?;
            m.model.adapter = Some(adapter);
            eval_loss(&m, &path, args.max_seq_length)?
        };
        let output = args.output.display().to_string();
        let merged = eval_loss(
            &crate::model::load(&output, &LoadOptions::cpu_f32(), None)?,
            &path,
            args.max_seq_length,
        )?;
        println!(
            "validation loss on {} ({} tokens): base + adapter {:.4}, merged {:.4} (difference {:+.4})",
            path.display(),
            unmerged.tokens,
            unmerged.loss,
            merged.loss,
            merged.loss - unmerged.loss
        );
    }
    Ok(())
}

/// The adapter directory must hold a PEFT adapter; say so before loading anything.
pub fn check_adapter_dir(dir: &Path) -> Result<()> {
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        if !dir.join(f).is_file() {
            return Err(Error::Usage(format!(
                "--adapter {}: no {f}; pass the adapter directory that `your_ai train` wrote \
                 (it holds adapter_config.json and adapter_model.safetensors)",
                dir.display()
            )));
        }
    }
    Ok(())
}

fn validation_file(data: &Path) -> Result<PathBuf> {
    let files = resolve_files(data)?;
    let path = if data.is_dir() {
        files.valid.or(files.test).unwrap_or(files.train)
    } else {
        files.train
    };
    read_jsonl(&path)?;
    Ok(path)
}

fn eval_loss(m: &LoadedModel, path: &Path, max_len: usize) -> Result<EvalResult> {
    let records = read_jsonl(path)?;
    let encoder = Encoder::new(&m.tokenizer, true, max_len)?;
    let samples = records
        .iter()
        .map(|r| encoder.encode(r))
        .collect::<Result<Vec<_>, _>>()?;
    let r = evaluate(&m.model, &samples, 1)?;
    if r.tokens == 0 {
        return Err(Error::Usage(format!(
            "--data {}: no scored tokens (every example was empty after masking)",
            path.display()
        )));
    }
    Ok(r)
}
