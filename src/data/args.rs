//! The flags that choose the data and the shape of its batches, declared once for `train`,
//! `eval` and `estimate`.

use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The shape of a batch.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Data")]
pub struct BatchArgs {
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Longer examples are truncated (and counted in a warning).
    #[arg(long, default_value_t = DEFAULT_MAX_SEQ_LENGTH)]
    pub max_seq_length: usize,
}

impl BatchArgs {
    /// Values no run can use, named by their flag.
    pub fn check(&self) -> crate::Result<()> {
        use crate::error::Error;
        if self.batch_size == 0 {
            return Err(Error::Usage("--batch-size 0: it must be at least 1".into()));
        }
        if self.batch_size > MAX_BATCH_SIZE {
            return Err(Error::Usage(format!(
                "--batch-size {}: at most {MAX_BATCH_SIZE}; for a larger effective batch, add \
                 --grad-accumulation-steps",
                self.batch_size
            )));
        }
        if self.max_seq_length < 2 {
            return Err(Error::Usage("--max-seq-length must be at least 2".into()));
        }
        if self.max_seq_length > MAX_SEQ_LENGTH {
            return Err(Error::Usage(format!(
                "--max-seq-length {}: at most {MAX_SEQ_LENGTH} tokens",
                self.max_seq_length
            )));
        }
        Ok(())
    }
}

impl BatchArgs {
    /// `--max-seq-length` within the model's `context`, as `train` and `estimate` take it: a
    /// length the user gave (`given`) over it is refused; the default is lowered to it, with a
    /// note.
    pub fn fit_context(&mut self, context: usize, given: bool) -> crate::Result<()> {
        if self.max_seq_length <= context {
            return Ok(());
        }
        if given {
            return Err(crate::error::Error::Usage(format!(
                "--max-seq-length {}: the model's context is {context} tokens \
                 (max_position_embeddings); use at most {context}",
                self.max_seq_length
            )));
        }
        eprintln!(
            "note: --max-seq-length lowered from its default {} to the model's context, {context} tokens",
            self.max_seq_length
        );
        self.max_seq_length = context;
        Ok(())
    }
}

/// Bounds far above any machine's memory, so that sizes multiplied in the estimate (and the
/// searches for what fits, which step through smaller values) stay small.
pub const MAX_BATCH_SIZE: usize = 1 << 16;
pub const MAX_SEQ_LENGTH: usize = 1 << 20;
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 1024;

/// Where the examples come from and which of their tokens are scored.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(next_help_heading = "Data")]
pub struct DataArgs {
    /// A directory with train.jsonl (and valid.jsonl, test.jsonl) or one JSONL file.
    #[arg(short, long, default_value = "data")]
    pub data: PathBuf,
    /// Score only assistant turns and completions (the default).
    #[arg(long, default_value_t = true, overrides_with = "no_mask_prompt")]
    pub mask_prompt: bool,
    /// Score every token, prompts included.
    #[arg(long)]
    #[serde(skip_serializing, default)]
    pub no_mask_prompt: bool,
}
