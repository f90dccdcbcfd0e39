//! The real thing: LoRA on SmolLM2-135M-Instruct learns facts about an invented country. The
//! validation loss falls, the fine-tuned model answers a trained question it could not answer
//! before, and resident memory stays flat from step to step.

mod common;

use common::{cli, metrics, smollm2};

#[test]
fn smollm2_learns_the_invented_country_with_flat_memory() {
    let model = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invented-country");
    let question = "What is the capital of Brellonia?";
    let answer = |adapter: Option<&std::path::Path>| -> String {
        let mut c = cli();
        c.args([
            "generate",
            "--max-tokens",
            "32",
            "--prompt",
            question,
            "--model",
        ])
        .arg(&model);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    assert!(
        !answer(None).contains("Marrowick"),
        "the base model cannot know this"
    );

    cli()
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .args([
            "--max-steps",
            "60",
            "--batch-size",
            "4",
            "--lora-rank",
            "16",
            "--learning-rate",
            "3e-4",
            "--warmup-steps",
            "5",
            "--max-seq-length",
            "256",
            "--steps-per-eval",
            "0",
            "--val-batches",
            "0",
        ])
        .assert()
        .success();

    let evals = metrics(&out.join("metrics.jsonl"), "eval");
    let first = evals.first().unwrap()["val_loss"].as_f64().unwrap();
    let last = evals.last().unwrap()["val_loss"].as_f64().unwrap();
    // Base SmolLM2 starts near its real perplexity on this chat data (≈2 nats), not near 0.
    assert!(
        (1.0..4.0).contains(&first),
        "initial validation loss {first}"
    );
    assert!(last < 0.5 * first, "validation loss {first} → {last}");
    assert!(answer(Some(&out)).contains("Marrowick"));

    let steps = metrics(&out.join("metrics.jsonl"), "train");
    let rss = |step: usize| steps[step - 1]["rss_bytes"].as_f64().unwrap();
    let (at5, at60) = (rss(5), rss(60));
    let drift = (at60 - at5).abs();
    assert!(
        drift <= (0.02 * at5).max(32e6),
        "resident memory {at5} at step 5, {at60} at step 60"
    );
}
