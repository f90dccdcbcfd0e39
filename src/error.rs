//! The one error type the binary reports. Each module has its own error enum that names the file,
//! field or flag at fault; this wraps them so `main` can print one clear message and exit non-zero.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::model::config::ConfigError),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error(transparent)]
    Source(#[from] crate::model::source::SourceError),
    #[error(transparent)]
    Tokenizer(#[from] crate::data::tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] crate::data::chat_template::TemplateError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Adapter(#[from] crate::model::lora::AdapterError),
    #[error(transparent)]
    Distrust(#[from] crate::distrust::DistrustError),
    /// Writing a fused model or an exported adapter failed; the message names what and why.
    #[error("{0}")]
    Export(String),
    /// A model (with its adapter) whose outputs are NaN or infinite: what it would print
    /// means nothing.
    #[error("{0}")]
    NotFinite(String),
    /// A generation that could not go on (a reply held to a shape no token continues).
    #[error("{0}")]
    Generation(String),
    /// A flag value that cannot work; the message names the flag and the fix.
    #[error("{0}")]
    Usage(String),
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// An MLX operation failed (the `mlx` engine); the message is MLX's.
    #[cfg(feature = "mlx")]
    #[error("array computation failed: {0}")]
    Mlx(#[from] crate::engine::mlx::error::MlxError),
    #[error(
        "stopped by {} after step {step}; checkpoint saved to {}. Resume with the same command plus --resume",
        crate::runtime::signals::name(*signal),
        checkpoint.display()
    )]
    Interrupted {
        signal: i32,
        step: usize,
        checkpoint: PathBuf,
    },
    /// A stop signal ended work that has nothing to save (an evaluation); the trainer turns it
    /// into [`Error::Interrupted`] once it has saved.
    #[error("stopped by {}", crate::runtime::signals::name(*signal))]
    Stopping { signal: i32 },
    #[error(
        "training diverged: {what}; stopped, and the checkpoints saved before it are kept \
         (none if it came before the first). Try a lower --learning-rate (now {learning_rate:e})"
    )]
    Diverged { what: String, learning_rate: f64 },
    #[error(
        "no step updated the adapter: all {steps} steps were skipped (the notes above say why: \
         no trained tokens in the batch, or a non-finite loss), so no adapter is kept. \
         Check that the examples keep trained tokens within --max-seq-length (and, with \
         weights, a weight above 0), or train for more steps"
    )]
    NothingTrained { steps: usize },
    #[error(
        "memory budget exceeded: {measure} reached {:.2} GB, above the {:.2} GB budget, during \
         step {step}; stopped before the system could run out. Checkpoint of step {saved_step} \
         saved to {}. Resume with the same command plus --resume and a larger --max-memory (a \
         run that used --auto-fit: give the batch size it chose, --batch-size N, in its place, \
         as a resumed run keeps its batch), or, where blocks kept their activations, with \
         --keep-activations none (less memory, the same results); a smaller --batch-size or \
         --max-seq-length changes what is trained, so it needs a new run in another --output",
        *peak as f64 / 1e9,
        *budget as f64 / 1e9,
        checkpoint.display()
    )]
    MemoryBudget {
        /// What was measured: "resident memory" or "MLX memory".
        measure: &'static str,
        step: usize,
        saved_step: usize,
        peak: u64,
        budget: u64,
        checkpoint: PathBuf,
    },
}

impl Error {
    /// Exit status: 2 for a command line that cannot work (as clap does), 128 + signal after a
    /// signal, 3 when the memory budget stopped training, 4 when training diverged, 1 for
    /// everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            // A flag naming a model that is not there is a command-line mistake, as a missing
            // --adapter or --data path is.
            Error::Usage(_)
            | Error::Adapter(crate::model::lora::AdapterError::NoSuchDir { .. })
            | Error::Source(
                crate::model::source::SourceError::NoSuchPath { .. }
                | crate::model::source::SourceError::Unknown { .. },
            ) => 2,
            Error::Interrupted { signal, .. } | Error::Stopping { signal } => {
                crate::runtime::signals::exit_status(*signal)
            }
            Error::MemoryBudget { .. } => 3,
            Error::Diverged { .. } => 4,
            _ => 1,
        }
    }

    /// A failing chat template named as `model`'s, with `hint` after it
    /// ([`TemplateError::of_model`](crate::data::chat_template::TemplateError::of_model));
    /// any other error as it is.
    pub fn template_of(self, model: &str, hint: &'static str) -> Self {
        match self {
            Error::Template(t) => Error::Template(t.of_model(model, hint)),
            e => e,
        }
    }

    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
