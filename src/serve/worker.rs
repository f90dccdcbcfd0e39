//! The one thread that owns the model and generates, one request at a time, in the order they
//! came: requests wait in a bounded queue, and a client that goes away stops its generation
//! at the next token, or the next piece of a long prompt (its channel closes). Text is handed
//! over without waiting, so a client that stops reading holds up no one. When the server
//! stops, the running generation ends at its next token and those waiting are turned away.

use crate::data::tokenizer::Tokenizer;
use crate::infer::generate::{generate_with, Sampling, StopReason};
use crate::infer::shape::Shape;
use crate::model::lora::Adapter;
use crate::model::Llama;
use std::cell::Cell;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Whether a reply's text so far is the whole reply.
pub type Done = Box<dyn Fn(&str) -> bool + Send>;

/// One generation to run.
pub struct Job {
    /// Which adapter applies (None: the base model).
    pub adapter: Option<String>,
    pub ids: Vec<u32>,
    /// What the reply must be: free, a call (where it calls), or JSON.
    pub shape: Shape,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// Whether the text so far is a whole reply (a forced call's calls made): it ends there.
    pub done: Option<Done>,
    /// Where its text goes; closed when the client is gone.
    pub events: mpsc::UnboundedSender<Event>,
    /// For the log line.
    pub label: String,
}

#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        /// `stop` (an end token or a stop string) or `length`.
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
    /// The server stopped before the generation could finish (or start).
    ServerStopping,
}

/// Runs the jobs of `queue` on `model` until every sender is gone; once `stopping` is set,
/// the running job ends at its next token and the rest fail.
pub fn run(
    mut model: Llama,
    tokenizer: Arc<Tokenizer>,
    adapters: HashMap<String, Adapter>,
    queue: std::sync::mpsc::Receiver<Job>,
    stopping: Arc<AtomicBool>,
) {
    for job in queue {
        if job.events.is_closed() {
            eprintln!("[serve] {}: client gone before its turn", job.label);
            continue;
        }
        if stopping.load(Ordering::Relaxed) {
            let _ = job.events.send(Event::ServerStopping);
            continue;
        }
        model.adapter = job.adapter.as_ref().and_then(|a| adapters.get(a)).cloned();
        let start = Instant::now();
        let mut out = Stops::new(&job.stop);
        let (gone, cut) = (Cell::new(false), Cell::new(false));
        // Between pieces of the prompt (minutes, for a long one on a CPU): a client gone or a
        // server stopping ends the work there.
        let keep_on = || {
            gone.set(job.events.is_closed());
            cut.set(stopping.load(Ordering::Relaxed));
            if gone.get() || cut.get() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let result = generate_with(
            &model,
            &tokenizer,
            (&job.ids, &job.shape),
            &job.sampling,
            keep_on,
            |piece| {
                let (send, stopped) = out.push(piece);
                if !send.is_empty() && job.events.send(Event::Text(send)).is_err() {
                    gone.set(true);
                    return ControlFlow::Break(());
                }
                if stopping.load(Ordering::Relaxed) {
                    cut.set(true);
                    return ControlFlow::Break(());
                }
                if stopped || job.done.as_ref().is_some_and(|done| done(&out.text)) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        let (mut gone, cut) = (gone.get(), cut.get());
        let event = match result {
            Ok(r) => {
                let rest = out.finish();
                if !gone && !cut && !rest.is_empty() {
                    gone = job.events.send(Event::Text(rest)).is_err();
                }
                eprintln!(
                    "[serve] {}: {} prompt + {} generated tokens in {:.1} s{}",
                    job.label,
                    r.prompt_tokens,
                    r.ids.len(),
                    start.elapsed().as_secs_f64(),
                    if gone {
                        ", client gone: stopped"
                    } else if cut {
                        ", cut short: the server is stopping"
                    } else {
                        ""
                    }
                );
                if cut {
                    Event::ServerStopping
                } else {
                    Event::Done {
                        finish_reason: match r.stop {
                            StopReason::MaxTokens => "length",
                            StopReason::EndToken(_) | StopReason::Stopped => "stop",
                        },
                        prompt_tokens: r.prompt_tokens,
                        completion_tokens: r.ids.len(),
                    }
                }
            }
            Err(e) => {
                eprintln!("[serve] {}: failed: {e}", job.label);
                // The client gets the message, not a backtrace (RUST_BACKTRACE) with the
                // server's paths: that stays in the log.
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                Event::Failed(first)
            }
        };
        if !gone {
            let _ = job.events.send(event);
        }
    }
}

/// Text on its way out, held back while it could still be the start of a stop string, and cut
/// before the first stop string that appears.
struct Stops<'a> {
    stop: &'a [String],
    text: String,
    sent: usize,
}

impl<'a> Stops<'a> {
    fn new(stop: &'a [String]) -> Self {
        Self {
            stop,
            text: String::new(),
            sent: 0,
        }
    }

    /// Adds `piece`: the text now safe to send, and whether a stop string was reached.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            return (self.take(at), true);
        }
        // The longest tail that is a proper prefix of some stop string stays back.
        let held = self
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|p| self.text.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let upto = self.text.len() - held;
        (self.take(upto), false)
    }

    fn take(&mut self, upto: usize) -> String {
        let upto = upto.max(self.sent);
        let s = self.text[self.sent..upto].to_string();
        self.sent = upto;
        s
    }

    /// Whatever is still held back.
    fn finish(&mut self) -> String {
        self.take(self.text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], pieces: &[&str]) -> (String, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut s = Stops::new(&stop);
        let mut out = String::new();
        for p in pieces {
            let (send, stopped) = s.push(p);
            out.push_str(&send);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_cut_the_text_even_across_pieces() {
        assert_eq!(run(&[], &["ab", "c"]), ("abc".into(), false));
        assert_eq!(
            run(&["END"], &["one E", "N", "D two"]),
            ("one ".into(), true)
        );
        assert_eq!(run(&["END"], &["one E", "x"]), ("one Ex".into(), false));
        assert_eq!(
            run(&["\n\n", "Q:"], &["a\n", "b Q", ":c"]),
            ("a\nb ".into(), true)
        );
        assert_eq!(run(&["é!"], &["café", " ok"]), ("café ok".into(), false));
    }
}
