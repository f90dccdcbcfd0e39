//! `your_ai eval`: loss and perplexity on a JSONL file.

use crate::cli::EvalArgs;
use crate::data::{read_jsonl, resolve_files, Encoder};
use crate::error::{Error, Result};
use crate::infer::eval::evaluate;

pub fn run(args: EvalArgs) -> Result<()> {
    let (batch, data) = (&args.batch, &args.data);
    if batch.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    if batch.max_seq_length < 2 {
        return Err(Error::Usage("--max-seq-length must be at least 2".into()));
    }
    let path = if data.data.is_dir() {
        let files = resolve_files(&data.data)?;
        files.valid.or(files.test).unwrap_or(files.train)
    } else {
        resolve_files(&data.data)?.train
    };
    let records = read_jsonl(&path)?;
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
    let mask_prompt = data.mask_prompt && !data.no_mask_prompt;
    let encoder = Encoder::new(&loaded.tokenizer, mask_prompt, max_seq_length)?;
    let samples = records
        .iter()
        .map(|r| encoder.encode(r))
        .collect::<Result<Vec<_>, _>>()?;
    let truncated = samples.iter().filter(|s| s.truncated > 0).count();
    if truncated > 0 {
        eprintln!(
            "warning: {truncated} example(s) longer than --max-seq-length {max_seq_length} were truncated"
        );
    }
    let result = evaluate(&loaded.model, &samples, batch.batch_size)?;
    if result.tokens == 0 {
        return Err(Error::Usage(format!(
            "{}: no scored tokens (every example was empty after masking)",
            path.display()
        )));
    }
    println!("data: {} ({} examples)", path.display(), result.examples);
    println!("loss: {:.4}", result.loss);
    println!("perplexity: {:.3}", result.perplexity());
    println!("tokens: {}", result.tokens);
    Ok(())
}
