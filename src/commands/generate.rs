//! `your_ai generate`: chat-templated (or raw) prompt in, streamed reply out.

use crate::cli::GenerateArgs;
use crate::error::{Error, Result};
use crate::infer::generate::{generate_with, StopReason};
use crate::infer::prompt::{chat_ids, user_turn};
use crate::infer::shape::schema::Grammar;
use crate::infer::shape::{check_writable, Shape};

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut sampling = args.sampling.sampling()?;
    // Before minutes of loading: an empty message gives the model nothing to reply to.
    if !args.raw && args.prompt.trim().is_empty() {
        return Err(Error::Usage(
            "--prompt is empty: give the message the model replies to (or --raw, to continue \
             from the start token alone)"
                .into(),
        ));
    }
    let shape = shape(&args)?;
    if shape != Shape::Free && args.sampling.ignore_eos {
        return Err(Error::Usage(
            "--json and --json-schema end the reply where its object closes, and --ignore-eos \
             would go on past it: give one of them"
                .into(),
        ));
    }
    let loaded = args.run.load_for_decoding(true)?;
    if let (Shape::Json(g), Some(path)) = (&shape, &args.json_schema) {
        check_writable(g, &loaded.tokenizer)
            .map_err(|why| Error::Usage(format!("--json-schema {}: {why}", path.display())))?;
    }
    let tok = &loaded.tokenizer;
    let prompt_ids = if args.raw {
        let mut text = String::new();
        if let Some(s) = &args.system {
            text.push_str(s);
            text.push('\n');
        }
        text.push_str(&args.prompt);
        tok.encode_with_bos(&text)?
    } else {
        chat_ids(tok, &user_turn(args.system.as_deref(), &args.prompt)).map_err(|e| {
            e.template_of(
                &args.run.model.model,
                "; --raw sends the prompt as plain text, without it",
            )
        })?
    };
    if prompt_ids.is_empty() {
        return Err(Error::Usage(
            "--prompt is empty and the tokenizer adds no start token: give the model some text to continue from".into(),
        ));
    }
    let mut out = crate::io::StreamedReply::default();
    // The prompt and the reply must fit the model's context.
    let context = loaded.model.cfg.max_position_embeddings;
    if prompt_ids.len() >= context {
        // The system prompt's share, where it alone fills the context, is what to shorten.
        let system_fills = match &args.system {
            Some(s) if args.raw => tok.encode_with_bos(s)?.len() >= context,
            Some(s) => chat_ids(tok, &user_turn(Some(s), ""))?.len() >= context,
            None => false,
        };
        let flag = if system_fills { "--system" } else { "--prompt" };
        return Err(Error::Usage(format!(
            "{flag}: the prompt is {} tokens, the model's context is {context}; shorten {}",
            prompt_ids.len(),
            if system_fills {
                "the system prompt"
            } else {
                "the prompt"
            }
        )));
    }
    let room = context - prompt_ids.len();
    if sampling.max_tokens > room {
        eprintln!(
            "note: --max-tokens {} lowered to {room}, what the model's context of {context} tokens leaves after the prompt",
            sampling.max_tokens
        );
        sampling.max_tokens = room;
    }
    let result = generate_with(
        &loaded.model,
        tok,
        (&prompt_ids, &shape),
        &sampling,
        || std::ops::ControlFlow::Continue(()),
        |piece| out.piece(piece),
    )?;
    out.end()?;
    let stop = match result.stop {
        StopReason::EndToken(_) => "end of turn",
        StopReason::MaxTokens => "--max-tokens reached",
        StopReason::Stopped => "stopped",
    };
    eprintln!(
        "[{} prompt tokens in {:.2} s | {} tokens in {:.2} s, {:.1} tokens/s | stopped: {} | load {:.2} s]",
        result.prompt_tokens,
        result.prefill_time.as_secs_f64(),
        result.ids.len(),
        result.decode_time.as_secs_f64(),
        result.decode_tokens_per_s(),
        stop,
        loaded.load_time.as_secs_f64()
    );
    Ok(())
}

/// What `--json` or `--json-schema` holds the reply to, read and checked before the model is.
fn shape(args: &GenerateArgs) -> Result<Shape> {
    let Some(path) = &args.json_schema else {
        return Ok(if args.json {
            Shape::json_object()
        } else {
            Shape::Free
        });
    };
    let bad = |why: String| Error::Usage(format!("--json-schema {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let schema: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let grammar = Grammar::from_schema(&schema).map_err(bad)?;
    Ok(Shape::Json(std::sync::Arc::new(grammar)))
}
