//! SIGINT / SIGTERM during training: the first is acknowledged at once and asks the trainer to
//! stop after the current block (or evaluation batch), save what is consistent and exit
//! (130 / 143); a second one exits at once, leaving the last good checkpoint as it was. While
//! `fuse` writes (a model-sized output), the first stops it after the current tensor, its
//! partial output removed. In `chat`, Ctrl-C ends the reply being written and the session
//! goes on; at the prompt it ends the session.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static REQUESTED: AtomicI32 = AtomicI32::new(0);
/// Set once the trained adapter is being written: a stop then ends nothing that is left.
static FINISHING: AtomicBool = AtomicBool::new(false);
/// Set by [`install_for_output`]: a command that writes one output, with no checkpoint.
static OUTPUT_ONLY: AtomicBool = AtomicBool::new(false);
/// Set by [`install_for_replies`]: `chat`, where a SIGINT ends the reply, not the session.
static REPLIES: AtomicBool = AtomicBool::new(false);
/// In `chat`, a reply is being written.
static REPLYING: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if REPLIES.load(Ordering::SeqCst) {
        if sig == libc::SIGINT && REPLYING.load(Ordering::SeqCst) {
            REQUESTED.store(sig, Ordering::SeqCst);
            return;
        }
        // SAFETY: write and _exit are async-signal-safe; chat writes no file.
        unsafe {
            libc::write(2, b"\n".as_ptr().cast(), 1);
            libc::_exit(128 + sig)
        };
    }
    let output_only = OUTPUT_ONLY.load(Ordering::SeqCst);
    if REQUESTED.swap(sig, Ordering::SeqCst) != 0 {
        const AGAIN: &[u8] = b"\nsecond stop signal: exiting now; the last checkpoint is kept\n";
        const AGAIN_OUTPUT: &[u8] = b"\nsecond stop signal: exiting now\n";
        let again = if output_only { AGAIN_OUTPUT } else { AGAIN };
        // SAFETY: write and _exit are async-signal-safe; nothing is half-written because every
        // file is written to a temporary name and renamed into place.
        unsafe {
            libc::write(2, again.as_ptr().cast(), again.len());
            libc::_exit(128 + sig)
        };
    }
    const FIRST: &[u8] =
        b"\nstopping: the current block ends, then a checkpoint is saved (a second signal exits at once)\n";
    const WRITING: &[u8] = b"\nstopping: the trained adapter is being written and is kept; \
        what follows it is skipped (a second signal exits at once, the last checkpoint kept)\n";
    const OUTPUT: &[u8] =
        b"\nstopping: the partial output is removed (a second signal exits at once)\n";
    let said = if output_only {
        OUTPUT
    } else if FINISHING.load(Ordering::SeqCst) {
        WRITING
    } else {
        FIRST
    };
    // SAFETY: write is async-signal-safe; the buffers are statics.
    unsafe { libc::write(2, said.as_ptr().cast(), said.len()) };
}

/// Installs the handlers (training only; other commands keep the default behaviour).
pub fn install() {
    #[cfg(unix)]
    // SAFETY: the handler only touches an atomic and calls write and _exit, all
    // async-signal-safe.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Installs the handlers for a command that writes one output (`fuse`): a stop ends its work
/// at the next check of [`requested`], and the partial output goes with it.
pub fn install_for_output() {
    OUTPUT_ONLY.store(true, Ordering::SeqCst);
    install();
}

/// Installs the handlers for `chat` at a terminal: a SIGINT while [`replying`] ends the reply
/// (seen through [`requested`]); any other stop signal ends the session, as by default.
pub fn install_for_replies() {
    REPLIES.store(true, Ordering::SeqCst);
    install();
}

/// In `chat`: a reply starts (any earlier stop is forgotten) or has ended.
pub fn replying(on: bool) {
    if on {
        REQUESTED.store(0, Ordering::SeqCst);
    }
    REPLYING.store(on, Ordering::SeqCst);
}

/// The run is writing its trained adapter: a first stop signal says so, rather than that a
/// checkpoint follows.
pub fn finishing() {
    FINISHING.store(true, Ordering::SeqCst);
}

/// The signal received, if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Conventional exit status for a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM).
pub fn exit_status(sig: i32) -> i32 {
    128 + sig
}

pub fn name(sig: i32) -> &'static str {
    match sig {
        2 => "SIGINT",
        15 => "SIGTERM",
        _ => "a signal",
    }
}
