//! `your_ai chat`: a conversation in the terminal. Each line read is a user turn; the reply
//! streams out as it is generated, and the whole conversation is the next turn's prompt
//! (oldest turns dropped, with a note, when it outgrows the model's context). `/reset` starts
//! over; an empty line, `/exit` or end of input ends it. At a terminal, Ctrl-C ends the reply
//! being written (what was written stays in the conversation), and at the prompt the session.

use crate::cli::ChatArgs;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::infer::generate::{generate_with, StopReason};
use crate::infer::prompt::chat_ids;
use crate::infer::shape::Shape;
use crate::runtime::signals;
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;

pub fn run(args: ChatArgs) -> Result<()> {
    let model = args.run.model.model.clone();
    session(args).map_err(|e| {
        e.template_of(
            &model,
            " (generate --raw sends a prompt as plain text, without it)",
        )
    })
}

fn session(args: ChatArgs) -> Result<()> {
    let mut sampling = args.sampling.sampling()?;
    let loaded = args.run.load_for_decoding(true)?;
    let tok = &loaded.tokenizer;
    let context = loaded.model.cfg.max_position_embeddings;
    let interactive = std::io::stdin().is_terminal();
    let system: Vec<Value> = args
        .system
        .iter()
        .map(|s| json!({"role": "system", "content": s}))
        .collect();
    let mut turns: Vec<Value> = vec![];
    // A system prompt that fills the context would refuse every message as too long.
    if !system.is_empty() {
        let mut alone = system.clone();
        alone.push(json!({"role": "user", "content": ""}));
        let n = chat_ids(tok, &alone)?.len();
        if n >= context / 2 {
            return Err(Error::Usage(format!(
                "--system: {n} tokens with the template, and a conversation needs room beside \
                 it in the model's context of {context} tokens (at most half of it); shorten it"
            )));
        }
    }
    if interactive {
        signals::install_for_replies();
        eprintln!(
            "chatting with {}{} (/reset starts over, Ctrl-C stops a reply, an empty line or \
             /exit ends)",
            loaded.name,
            args.run
                .adapter
                .as_ref()
                .map_or(String::new(), |a| format!(" + {}", a.display()))
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().split(b'\n');
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::io("read", "standard input", e))?;
        // One line of other bytes is refused alone; the conversation goes on.
        let Ok(line) = String::from_utf8(line) else {
            eprintln!("(that line is not UTF-8 text, and was not sent: type it again)");
            continue;
        };
        let text = line.trim_end_matches('\r');
        match text.trim() {
            "" | "/exit" | "/quit" => break,
            "/reset" => {
                turns.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        turns.push(json!({"role": "user", "content": text}));
        // Room for the reply: --max-tokens, up to half the context.
        let room = args.sampling.max_tokens.min(context / 2);
        let Some(ids) = fit(tok, &system, &mut turns, context, room)? else {
            continue;
        };
        sampling.max_tokens = args.sampling.max_tokens.min(context - ids.len());
        let mut out = crate::io::StreamedReply::default();
        let go_on = || match signals::requested() {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        };
        signals::replying(true);
        let r = generate_with(
            &loaded.model,
            tok,
            (&ids, &Shape::Free),
            &sampling,
            go_on,
            |piece| {
                out.piece(piece)?;
                go_on()
            },
        );
        signals::replying(false);
        let r = r?;
        out.end()?;
        let stopped = r.stop == StopReason::Stopped;
        eprintln!(
            "[{} prompt tokens, {} generated, {:.1} tokens/s{}]",
            r.prompt_tokens,
            r.ids.len(),
            r.decode_tokens_per_s(),
            if stopped { "; stopped" } else { "" }
        );
        if stopped && r.text.is_empty() {
            // Stopped before a word of it: the message goes unanswered, and out of the
            // conversation.
            turns.pop();
            continue;
        }
        turns.push(json!({"role": "assistant", "content": r.text}));
        sampling.seed = sampling.seed.wrapping_add(1);
    }
    Ok(())
}

/// The prompt for the conversation `system` + `turns`, whose last turn is the new message. A
/// message too long for the context on its own is refused and taken back, the earlier turns
/// kept; otherwise the oldest whole exchanges go first until the prompt leaves `room` tokens
/// of the context for the reply (a reply is not cut short to keep an old exchange).
fn fit(
    tok: &Tokenizer,
    system: &[Value],
    turns: &mut Vec<Value>,
    context: usize,
    room: usize,
) -> Result<Option<Vec<u32>>> {
    let prompt = |turns: &[Value]| -> Result<Vec<u32>> {
        let messages: Vec<Value> = system.iter().chain(turns).cloned().collect();
        chat_ids(tok, &messages)
    };
    let alone = prompt(&turns[turns.len() - 1..])?;
    if alone.len() >= context {
        eprintln!(
            "this message alone is {} tokens, the model's context is {context}: shorten it",
            alone.len()
        );
        turns.pop();
        return Ok(None);
    }
    if turns.len() == 1 {
        return Ok(Some(alone));
    }
    loop {
        let ids = prompt(turns)?;
        if ids.len() + room <= context || turns.len() <= 1 {
            return Ok(Some(ids));
        }
        turns.drain(..2.min(turns.len() - 1));
        eprintln!("(the conversation outgrew the model's context: its oldest exchange is dropped)");
    }
}
