//! `your_ai eval`: loss and perplexity on a JSONL file; with `--method dpo|orpo`, the
//! preference loss, reward accuracy and margin on a file of preference pairs.

use crate::cli::EvalArgs;
use crate::data::files::{read_jsonl, resolve_files};
use crate::data::preference::{read_preferences, PreferenceExample};
use crate::data::Encoder;
use crate::engine::candle::preference;
use crate::error::{Error, Result};
use crate::infer::eval::evaluate;
use crate::model::LoadedModel;
use std::path::Path;

pub fn run(args: EvalArgs) -> Result<()> {
    let (batch, data) = (&args.batch, &args.data);
    if batch.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    if batch.max_seq_length < 2 {
        return Err(Error::Usage("--max-seq-length must be at least 2".into()));
    }
    let path = if data.data.is_dir() {
        // Held-out data first; a directory need not hold a train.jsonl to be evaluated.
        ["valid.jsonl", "test.jsonl", "train.jsonl"]
            .iter()
            .map(|n| data.data.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--data {}: no valid.jsonl, test.jsonl or train.jsonl in this directory; give \
                     one of them, or a JSONL file",
                    data.data.display()
                ))
            })?
    } else {
        resolve_files(&data.data)?.train
    };
    args.objective.check()?;
    let method = args.objective.method;
    if method.is_preference() && data.no_mask_prompt {
        return Err(Error::Usage(format!(
            "--no-mask-prompt with --method {}: a preference pair scores its answers only",
            method.name()
        )));
    }
    // Read (and every line checked) before the model loads.
    let records = if args.objective.method.is_preference() {
        vec![]
    } else {
        read_jsonl(&path)?
    };
    let pairs = if args.objective.method.is_preference() {
        read_preferences(&path)?
    } else {
        vec![]
    };
    let loaded = args.run.load(true)?;
    // Nothing is scored beyond the model's context.
    let context = loaded.model.cfg.max_position_embeddings;
    let max_seq_length = batch.max_seq_length.min(context);
    if max_seq_length < batch.max_seq_length {
        eprintln!(
            "note: examples are cut at the model's context, {context} tokens (--max-seq-length {})",
            batch.max_seq_length
        );
    }
    if args.objective.method.is_preference() {
        return evaluate_pairs(&args, &path, &pairs, &loaded, max_seq_length);
    }
    let mask_prompt = data.mask_prompt && !data.no_mask_prompt;
    let encoder = Encoder::new(&loaded.tokenizer, mask_prompt, max_seq_length)?;
    // Every bad example named at once, as train does.
    let (samples, errors): (Vec<_>, Vec<_>) = records
        .iter()
        .map(|r| encoder.encode(r))
        .partition(Result::is_ok);
    if !errors.is_empty() {
        let errors = errors
            .into_iter()
            .filter_map(|e| e.err())
            .map(|e| e.to_string());
        return Err(crate::data::DataError::invalid(errors.collect()).into());
    }
    let samples: Vec<_> = samples.into_iter().filter_map(Result::ok).collect();
    let truncated = samples.iter().filter(|s| s.truncated > 0).count();
    if truncated > 0 {
        eprintln!(
            "warning: {truncated} example(s) longer than --max-seq-length {max_seq_length} were truncated"
        );
    }
    let result = evaluate(&loaded.model, &samples, batch.batch_size)?;
    if result.tokens == 0 {
        return Err(Error::Usage(format!(
            "{}: no scored tokens (every example was empty after masking{}); check the data, \
             or pass --no-mask-prompt to score every token",
            path.display(),
            if truncated > 0 {
                " or cut off by --max-seq-length"
            } else {
                ""
            }
        )));
    }
    crate::io::print(&format!(
        "data: {} ({} examples)\nloss: {:.4}\nperplexity: {:.3}\ntokens: {}\n",
        path.display(),
        result.examples,
        result.loss,
        result.perplexity(),
        result.tokens
    ))?;
    not_finite(result.loss)
}

/// A loss that is NaN or infinite is a failure: the model (or its adapter) is damaged.
fn not_finite(loss: f64) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    Err(Error::NotFinite(format!(
        "the loss is {loss}: the model's outputs are not finite with these weights (a damaged \
         or diverged adapter, or a damaged model); nothing can be measured"
    )))
}

/// The β of the preference run that wrote the adapter in `dir` (its `train_config.json`).
fn run_beta(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("train_config.json")).ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    let preference = matches!(cfg["method"].as_str(), Some("dpo" | "orpo"));
    cfg["beta"].as_f64().filter(|_| preference)
}

/// `eval --method dpo|orpo`: the adapter's preference loss and reward accuracy on `rows`.
fn evaluate_pairs(
    args: &EvalArgs,
    path: &Path,
    rows: &[(PreferenceExample, String)],
    loaded: &LoadedModel,
    max_seq_length: usize,
) -> Result<()> {
    let o = &args.objective;
    let encoder = Encoder::new(&loaded.tokenizer, true, max_seq_length)?;
    let (pairs, cut_off) = encoder.encode_pairs(rows)?;
    if !cut_off.is_empty() {
        eprintln!(
            "warning: {} pair(s) have an answer with no token left within --max-seq-length \
             {max_seq_length}, or answers cut to the same tokens ({}), and are left out",
            cut_off.len(),
            crate::io::first_few(&cut_off),
        );
    }
    if pairs.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no pair has both answers within --max-seq-length {max_seq_length} (the prompts \
             fill it); raise --max-seq-length",
            path.display()
        )));
    }
    let truncated = pairs
        .iter()
        .filter(|p| p.chosen.truncated > 0 || p.rejected.truncated > 0)
        .count();
    if truncated > 0 {
        eprintln!(
            "warning: {truncated} pair(s) longer than --max-seq-length {max_seq_length} were truncated"
        );
    }
    // DPO's rewards are against the base model (ORPO has no reference).
    if loaded.model.adapter.is_none() && o.method == crate::engine::objective::Method::Dpo {
        eprintln!(
            "note: no --adapter: the policy is the base model, which is also the reference, so \
             every reward is 0"
        );
    }
    if let Some(trained) = args.run.adapter.as_deref().and_then(run_beta) {
        if trained != o.beta {
            eprintln!(
                "note: the adapter's run trained with --beta {trained}; these figures use --beta \
                 {} (pass --beta {trained} to match its validation figures)",
                o.beta
            );
        }
    }
    let s = preference::evaluate(
        &loaded.model,
        &pairs,
        args.batch.batch_size,
        o.method,
        o.beta,
    )?;
    let loss = s.objective(o.method);
    crate::io::print(&format!(
        "data: {} ({} pairs)\n{} loss: {loss:.4}\naccuracy: {:.1}% (reward accuracy)\n\
         margin: {:.4} (mean reward margin)\nprefers chosen: {:.1}% (log π(chosen) > \
         log π(rejected) under the policy itself)\nrewards: chosen {:.4}, rejected {:.4} \
         (mean, beta {})\n",
        path.display(),
        s.pairs,
        o.method.name(),
        100.0 * s.accuracy(),
        s.margin(),
        100.0 * s.prefers_chosen(),
        s.chosen(),
        s.rejected(),
        o.beta
    ))?;
    not_finite(loss)
}
