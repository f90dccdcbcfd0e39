//! SIGINT / SIGTERM during training: the first asks the trainer to finish its step, save a
//! checkpoint and exit (130 / 143); a second one exits at once, leaving the last good
//! checkpoint as it was.

use std::sync::atomic::{AtomicI32, Ordering};

static REQUESTED: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if REQUESTED.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe; nothing is half-written because every file is
        // written to a temporary name and renamed into place.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the handlers (training only; other commands keep the default behaviour).
pub fn install() {
    #[cfg(unix)]
    // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
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
