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
fn chat_prompts(input: &str) -> (Vec<usize>, String) {
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
    let (with, err) = chat_prompts(&format!("My name is Bob.\n{long}\nWhat is my name?\n"));
    assert!(err.contains("this message alone is"), "{err}");
    assert!(!err.contains("oldest exchange is dropped"), "{err}");
    let (without, _) = chat_prompts("My name is Bob.\nWhat is my name?\n");
    // The refused message took nothing with it: the last turn's prompt is the same.
    assert_eq!(with, without);
    assert_eq!(with.len(), 2);
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
