//! The training data as a run reads it: a huge row costs only its kept tokens, and an example
//! that truncation leaves with nothing to train is named by file:line and left out.

mod common;

use common::metrics;
use std::process::Output;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A single huge row costs what its kept tokens cost: it is cut before it is tokenized (a
/// 20 MB line used to be tokenized whole, gigabytes for 64 kept tokens), and the tokens kept
/// are the ones the whole row would have given.
#[test]
fn a_huge_row_is_cut_before_it_is_tokenized() {
    let r = common::tiny_run(4);
    let words: Vec<String> = (0..5_000_000).map(|i| format!("w{}", i % 977)).collect();
    let huge = serde_json::json!({"text": words.join(" ")}).to_string();
    assert!(huge.len() > 20_000_000);
    let data = r.root.join("huge");
    std::fs::create_dir_all(&data).unwrap();
    let small = std::fs::read_to_string(r.data.join("train.jsonl")).unwrap();
    std::fs::write(data.join("train.jsonl"), format!("{small}{huge}\n")).unwrap();
    let out = r.root.join("huge-out");
    let o = r
        .train_command(&out)
        .args(["--data", data.to_str().unwrap()])
        .args([
            "--max-steps",
            "1",
            "--batch-size",
            "1",
            "--max-seq-length",
            "64",
        ])
        .args([
            "--lora-rank",
            "4",
            "--steps-per-eval",
            "0",
            "--no-save-best",
        ])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("1 example(s) longer than --max-seq-length 64"),
        "{e}"
    );
    let peak = metrics(&out.join("metrics.jsonl"), "end")[0]["peak_rss_bytes"]
        .as_f64()
        .unwrap();
    assert!(peak < 1.0e9, "peak resident memory {:.2} GB", peak / 1e9);

    // The kept tokens are the whole row's first 64.
    let g = your_ai::weights::GgufFile::open(&common::smollm2()).unwrap();
    let tok = your_ai::data::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let text: String = words[..20_000].join(" ");
    let rec = |t: &str| your_ai::data::Record {
        example: your_ai::data::Example::Text(t.to_string()),
        location: "x:1".into(),
        fields: Default::default(),
    };
    let enc = your_ai::data::Encoder::new(&tok, true, 64).unwrap();
    let cut = enc.encode(&rec(&text)).unwrap();
    let whole = your_ai::data::Encoder::new(&tok, true, 100_000)
        .unwrap()
        .encode(&rec(&text))
        .unwrap();
    assert!(whole.ids.len() > 1000);
    assert_eq!(cut.ids, whole.ids[..64]);
    assert!(cut.truncated > 0);
}

/// An example whose trained tokens truncation cut off entirely trains nothing: it is left out
/// (not a batch slot, or a whole step, with nothing to learn), and the warning names it by
/// file:line, so it can be found.
#[test]
fn an_example_cut_off_entirely_is_named_and_left_out() {
    let r = common::tiny_run(4);
    let dir = r.root.join("cut");
    std::fs::create_dir_all(&dir).unwrap();
    let chat = |user: &str| {
        serde_json::json!({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "Marrowick."}
        ]})
        .to_string()
    };
    let long = "Tell me about the rivers and the hills of the old country. ".repeat(20);
    // Two that train among six cut off: kept, the four batches of two of an epoch would hold
    // at least two with nothing to train.
    let mut rows = vec![chat("Which city?"), chat(&long), chat("And the river?")];
    rows.extend((0..5).map(|_| chat(&long)));
    std::fs::write(dir.join("train.jsonl"), rows.join("\n") + "\n").unwrap();
    let out = r.root.join("cut-out");
    let o = r
        .train_command(&out)
        .args(["--data", dir.to_str().unwrap(), "--max-seq-length", "64"])
        .args(["--max-steps", "4", "--batch-size", "2", "--lora-rank", "4"])
        .args(["--steps-per-eval", "0"])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("6 example(s) have no trained token left")
            && e.contains("train.jsonl:2, ")
            && e.contains("train.jsonl:7, …) and are left out"),
        "{e}"
    );
    let steps = metrics(&out.join("metrics.jsonl"), "train");
    assert_eq!(steps.len(), 4);
    assert!(steps.iter().all(|s| s["loss"].is_f64()), "{steps:?}");
}

/// A row with the fields of two formats (a dataset that keeps a `text` rendering beside its
/// `messages`) is read in the first, and said so, naming the row.
#[test]
fn rows_with_two_formats_are_named() {
    let r = common::tiny_run(4);
    let dir = r.root.join("mixed");
    std::fs::create_dir_all(&dir).unwrap();
    let rows = std::fs::read_to_string(r.data.join("train.jsonl")).unwrap();
    let mixed = serde_json::json!({
        "messages": [{"role": "user", "content": "Which city?"},
                     {"role": "assistant", "content": "Marrowick."}],
        "text": "Which city? Marrowick.",
    });
    std::fs::write(dir.join("train.jsonl"), format!("{rows}{mixed}\n")).unwrap();
    let n = rows.lines().count() + 1;
    let o = r
        .train_command(&r.root.join("mixed-out"))
        .args(["--data", dir.to_str().unwrap()])
        .args(["--max-steps", "1", "--batch-size", "1", "--lora-rank", "4"])
        .args(["--steps-per-eval", "0"])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("note: 1 row(s) have the fields of more than one format (")
            && e.contains(&format!("mixed/train.jsonl:{n});"))
            && e.contains("(`messages` for the first named)"),
        "{e}"
    );
}
