//! `your_ai chat` as a user pipes into it: the conversation is the next turn's prompt, `/reset`
//! starts over, and a turn's reply is what `generate` gives for the same conversation.

mod common;

use common::{cli, smollm2};

#[test]
fn chat_keeps_the_conversation_and_resets_it() {
    let q = "What is the capital of France?";
    let o = cli()
        .args(["chat", "--max-tokens", "8", "--model"])
        .arg(smollm2())
        .write_stdin(format!("{q}\nAnd of Italy?\n/reset\n{q}\n"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let replies: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(replies.len(), 3, "{replies:?}");
    let prompts: Vec<usize> = err
        .lines()
        .filter_map(|l| l.strip_prefix('['))
        .filter_map(|l| l.split(" prompt tokens").next()?.parse().ok())
        .collect();
    assert_eq!(prompts.len(), 3, "{err}");
    // The second turn carries the first exchange; after /reset the prompt is the first again.
    assert!(prompts[1] > prompts[0] + 8, "{prompts:?}");
    assert_eq!(prompts[2], prompts[0]);
    assert_eq!(replies[0], replies[2]);
    let g = cli()
        .args(["generate", "--max-tokens", "8", "--prompt", q, "--model"])
        .arg(smollm2())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&g.stdout).trim_end(), replies[0]);
}

/// The prompt sizes `chat` reports, a turn each, and its stderr.
fn chat_prompts(input: impl Into<Vec<u8>>) -> (Vec<usize>, String) {
    let o = cli()
        .args(["chat", "--max-tokens", "4", "--model"])
        .arg(smollm2())
        .write_stdin(input)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let prompts = err
        .lines()
        .filter_map(|l| l.strip_prefix('['))
        .filter_map(|l| l.split(" prompt tokens").next()?.parse().ok())
        .collect();
    (prompts, err)
}

#[test]
fn chat_refuses_a_message_over_the_context_and_keeps_the_conversation() {
    let long = "hello ".repeat(9000);
    let (with, err) = chat_prompts(format!("My name is Bob.\n{long}\nWhat is my name?\n"));
    assert!(err.contains("this message alone is"), "{err}");
    assert!(!err.contains("oldest exchange is dropped"), "{err}");
    let (without, _) = chat_prompts("My name is Bob.\nWhat is my name?\n");
    // The refused message took nothing with it: the last turn's prompt is the same.
    assert_eq!(with, without);
    assert_eq!(with.len(), 2);
}

/// A line of other bytes than UTF-8 is refused alone, and the conversation goes on (it ended
/// the session); a system prompt that leaves no room for a conversation is refused at the
/// start (every message was refused as too long), and `generate` names it too.
#[test]
fn a_bad_line_is_refused_alone_and_a_long_system_prompt_at_the_start() {
    let mut input = b"My name is Bob.\n".to_vec();
    input.extend(b"\xff\xfe bad\n");
    input.extend(b"What is my name?\n");
    let (with, err) = chat_prompts(input);
    assert!(err.contains("not UTF-8 text, and was not sent"), "{err}");
    let (without, _) = chat_prompts("My name is Bob.\nWhat is my name?\n");
    assert_eq!(with, without, "{err}");
    let system = "word ".repeat(9000);
    for args in [
        ["chat", "--max-tokens", "4"],
        ["generate", "--prompt", "hi"],
    ] {
        let o = cli()
            .args(args)
            .args(["--system", &system, "--model"])
            .arg(smollm2())
            .write_stdin("hi\n")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("error: --system: "), "{err}");
    }
}

/// Old exchanges make way for the reply, not only for the prompt: with a 256-token context, a
/// second turn that would leave the reply a few tokens drops the first exchange instead, and
/// the reply gets its --max-tokens.
#[test]
fn the_reply_keeps_its_room_as_the_conversation_grows() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_chat_model(&tmp.path().join("model"));
    let message = "Tell me about the rivers and the hills. ".repeat(6);
    let o = cli()
        .args(["chat", "--max-tokens", "100", "--ignore-eos", "--model"])
        .arg(&model)
        .write_stdin(format!("{message}\n{message}\n"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let generated: Vec<usize> = err
        .lines()
        .filter_map(|l| {
            l.split(" generated")
                .next()?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(generated, [100, 100], "{err}");
    assert!(err.contains("oldest exchange is dropped"), "{err}");
}

/// At a terminal, Ctrl-C ends the reply being written and the session goes on; at the prompt
/// it ends the session (exit 130). Before, the first Ctrl-C ended the whole session.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_the_reply_and_at_the_prompt_the_session() {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    // Standard input is a terminal (its other end is the test's to type into), as chat's
    // handling of Ctrl-C needs; the output goes to pipes.
    let (mut keyboard, terminal) = unsafe {
        let (mut m, mut s) = (0, 0);
        // Null pointers of the `mut` kind: Linux takes `*const` for the last two, macOS `*mut`.
        let r = libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        assert_eq!(r, 0, "openpty");
        (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s))
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_your_ai"))
        .args(["chat", "--ignore-eos", "--max-tokens", "4000", "--model"])
        .arg(smollm2())
        .stdin(Stdio::from(terminal))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let collect = |mut from: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(String::new()));
        let to = buf.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 256];
            while let Ok(n @ 1..) = from.read(&mut b) {
                to.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&b[..n]));
            }
        });
        buf
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    let wait_for = |buf: &Arc<Mutex<String>>, what: &dyn Fn(&str) -> bool| {
        let start = Instant::now();
        while !what(&buf.lock().unwrap()) {
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "timed out; stdout: {}\nstderr: {}",
                out.lock().unwrap(),
                err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let interrupt = |pid: u32| unsafe { libc::kill(pid as i32, libc::SIGINT) };
    wait_for(&err, &|e| e.contains("Ctrl-C stops a reply"));
    writeln!(keyboard, "Tell me a long story about the sea.").unwrap();
    wait_for(&out, &|o| o.len() > 40);
    assert_eq!(interrupt(child.id()), 0);
    wait_for(&err, &|e| e.contains("; stopped]"));
    // The session goes on.
    assert!(
        child.try_wait().unwrap().is_none(),
        "{}",
        err.lock().unwrap()
    );
    writeln!(keyboard, "/reset").unwrap();
    wait_for(&err, &|e| e.contains("(conversation cleared)"));
    // At the prompt, Ctrl-C ends it.
    assert_eq!(interrupt(child.id()), 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{}", err.lock().unwrap());
    let reply = out.lock().unwrap().clone();
    assert!(reply.len() > 40 && reply.len() < 4000 * 8, "{reply}");
}
