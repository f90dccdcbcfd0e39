//! The citation scorer on hostile input (seeded random Unicode text and metadata: never a
//! panic, always w ∈ [0, 0.99] and a finite H ≥ 0, the same answer twice), and `your_ai score`
//! / `your_ai prepare` as a user runs them, bad input included.

mod common;

use common::cli;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use your_ai::distrust::scorer::{score, score_row, Metadata};

const PIECES: &[&str] = &[
    "WHO",
    "who",
    "whole",
    "NIH",
    "annihilate",
    "et al.",
    "[12]",
    "[1, 2-3]",
    "lab notebook",
    "we measured",
    "experts agree",
    "1887",
    "2023",
    "doi:",
    "patent",
    "Ünïcödé",
    "日本語",
    "🦀",
    "e\u{301}",
    "\u{200d}",
    "\u{feff}",
    "\0",
    "\r\n",
    "[",
    "]",
    "-",
    "1,234",
    "3.1887",
];

fn random_text(rng: &mut impl Rng) -> String {
    let n = rng.random_range(0..40);
    let mut s = String::new();
    for _ in 0..n {
        match rng.random_range(0..3) {
            0 => s.push_str(PIECES[rng.random_range(0..PIECES.len())]),
            1 => s.push(rng.random::<char>()),
            _ => s.push(' '),
        }
    }
    s
}

fn random_value(rng: &mut impl Rng) -> Value {
    match rng.random_range(0..7) {
        0 => Value::Null,
        1 => json!(rng.random_range(-5000i64..5000)),
        2 => json!(rng.random::<f64>() * 4000.0 - 1000.0),
        3 => json!(random_text(rng)),
        4 => json!([random_text(rng)]),
        5 => json!({"x": 1}),
        _ => json!(rng.random::<bool>()),
    }
}

#[test]
fn any_text_and_metadata_scores_in_range_without_panicking() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..20_000 {
        let text = random_text(&mut rng);
        let (a, b, c, d) = (
            random_text(&mut rng),
            random_text(&mut rng),
            random_text(&mut rng),
            random_text(&mut rng),
        );
        let meta = Metadata {
            source: rng.random::<bool>().then_some(a.as_str()),
            url: rng.random::<bool>().then_some(b.as_str()),
            publisher: rng.random::<bool>().then_some(c.as_str()),
            source_type: rng.random::<bool>().then_some(d.as_str()),
            year: rng.random::<bool>().then(|| rng.random()),
        };
        let s = score(&text, &meta);
        assert!(
            (0.0..=0.99).contains(&s.auth_weight),
            "{text:?}: w {}",
            s.auth_weight
        );
        assert!(
            s.prov_entropy.is_finite() && s.prov_entropy >= 0.0,
            "{text:?}"
        );
        assert_eq!(s, score(&text, &meta), "deterministic");

        // Whole rows with metadata of any JSON type: an answer or a reason, never a panic.
        let mut row = Map::new();
        row.insert("text".into(), json!(text));
        for key in ["source", "url", "publisher", "year", "date", "source_type"] {
            if rng.random::<bool>() {
                row.insert(key.into(), random_value(&mut rng));
            }
        }
        if let Ok(s) = score_row(&row) {
            assert!((0.0..=0.99).contains(&s.auth_weight));
            assert!(s.prov_entropy.is_finite() && s.prov_entropy >= 0.0);
        }
    }
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/distrust/raw.jsonl")
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o = cli().args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn rows(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn score_adds_both_fields_to_every_row_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("scored.jsonl");
    let o = out.to_str().unwrap();
    let (ok, _, err) = run(&["score", "-i", corpus().to_str().unwrap(), "-o", o]);
    assert!(ok, "{err}");
    let scored = rows(&out);
    assert_eq!(scored.len(), rows(&corpus()).len());
    for r in &scored {
        let w = r["auth_weight"].as_f64().unwrap();
        let h = r["prov_entropy"].as_f64().unwrap();
        assert!((0.0..=0.99).contains(&w) && h >= 0.0, "{r}");
        assert!(r["text"].is_string(), "the row's own fields are kept");
    }
    // Primary-source texts come out below the consensus texts, on average.
    let mean = |r: &[Value]| {
        r.iter()
            .map(|v| v["auth_weight"].as_f64().unwrap())
            .sum::<f64>()
            / r.len() as f64
    };
    assert!(mean(&scored[..18]) + 0.4 < mean(&scored[18..36]));
    // And the primary-source texts get the larger distrust D on average, as the README says.
    let mean_d = |r: &[Value]| {
        r.iter()
            .map(|v| {
                your_ai::distrust::formula::distrust_d(
                    2.7,
                    your_ai::distrust::formula::Provenance {
                        auth_weight: v["auth_weight"].as_f64().unwrap(),
                        prov_entropy: v["prov_entropy"].as_f64().unwrap(),
                    },
                )
            })
            .sum::<f64>()
            / r.len() as f64
    };
    let (primary, consensus) = (mean_d(&scored[..18]), mean_d(&scored[18..36]));
    assert!(
        (primary - 16.90).abs() < 0.01 && (consensus - 8.70).abs() < 0.01,
        "README figures: {primary} vs {consensus}"
    );

    // Refused: existing output without --force; then replaced with it.
    let (ok, _, err) = run(&["score", "-i", corpus().to_str().unwrap(), "-o", o]);
    assert!(
        !ok && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let (ok, _, _) = run(&[
        "score",
        "-i",
        corpus().to_str().unwrap(),
        "-o",
        o,
        "--force",
    ]);
    assert!(ok);
    assert_eq!(rows(&out), scored, "deterministic");

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\"}\n{\"text\": \"x\", \"url\": 7}\n{\"title\": \"no text\"}\nnot json\n",
    )
    .unwrap();
    let out2 = tmp.path().join("never.jsonl");
    let (ok, _, err) = run(&[
        "score",
        "-i",
        bad.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("bad.jsonl:3: unknown format"), "{err}");
    assert!(err.contains("bad.jsonl:4: not valid JSON"), "{err}");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\"}\n{\"text\": \"x\", \"url\": 7}\n",
    )
    .unwrap();
    let (ok, _, err) = run(&[
        "score",
        "-i",
        bad.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("bad.jsonl:2: `url` must be a string"),
        "{err}"
    );
    assert!(!out2.exists(), "nothing written");
    let (ok, _, err) = run(&[
        "score",
        "-i",
        "/nonexistent/raw.jsonl",
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("/nonexistent/raw.jsonl"), "{err}");
    std::fs::write(&bad, "\n").unwrap();
    let (ok, _, err) = run(&[
        "score",
        "-i",
        bad.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("holds no examples"), "{err}");
}

#[test]
fn prepare_dedupes_rebalances_splits_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let png = tmp.path().join("dist.png");
    let args = |extra: &[&str]| -> (bool, String, String) {
        let mut a = vec![
            "prepare",
            "--input",
            corpus().to_str().unwrap(),
            "--output",
            dir.to_str().unwrap(),
            "--plot",
            png.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        run(&refs)
    };
    let (ok, out, err) = args(&[]);
    assert!(ok, "{err}");
    assert!(err.contains("read 38 rows"), "{err}");
    assert!(
        err.contains("dropped 1 exact and 1 near-exact duplicate(s)"),
        "{err}"
    );
    assert!(
        out.contains("auth_weight (w)") && out.contains("prov_entropy (H, bits)"),
        "{out}"
    );
    assert!(out.contains(" 0.00– 0.10 | #"), "{out}");
    let (train, valid) = (
        rows(&dir.join("train.jsonl")),
        rows(&dir.join("valid.jsonl")),
    );
    // 18 low-authority texts; 18 high ones would be 50 %: rebalanced to 0.28 →
    // round(18 × 0.72 / 0.28) = 46 > 18 high, so the low side is cut instead:
    // round(18 × 0.28 / 0.72) = 7 low + 18 high = 25, split 10 % → 3 valid (rounded up to 1+).
    let all: Vec<&Value> = train.iter().chain(&valid).collect();
    let low = all
        .iter()
        .filter(|r| r["auth_weight"].as_f64().unwrap() < 0.3)
        .count();
    assert_eq!((low, all.len()), (7, 25), "{err}");
    assert_eq!(valid.len(), 3);
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");

    // Same seed, same files; existing output refused without --force.
    let before = std::fs::read(dir.join("train.jsonl")).unwrap();
    let (ok, _, err) = args(&[]);
    assert!(
        !ok && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let (ok, _, _) = args(&["--force"]);
    assert!(ok);
    assert_eq!(std::fs::read(dir.join("train.jsonl")).unwrap(), before);
    let (ok, _, _) = args(&["--force", "--seed", "7"]);
    assert!(ok);
    assert_ne!(std::fs::read(dir.join("train.jsonl")).unwrap(), before);
    let (ok, _, err) = args(&["--force", "--no-rebalance"]);
    assert!(ok, "{err}");
    assert_eq!(
        rows(&dir.join("train.jsonl")).len() + rows(&dir.join("valid.jsonl")).len(),
        36
    );

    // Bad input.
    let (ok, _, err) = args(&["--force", "--low-authority-share", "1.5"]);
    assert!(!ok && err.contains("--low-authority-share 1.5"), "{err}");
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let o2 = tmp.path().join("o2");
    let (ok, _, err) = run(&[
        "prepare",
        "-i",
        empty.to_str().unwrap(),
        "-o",
        o2.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("empty.jsonl: the file holds no examples"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "prepare",
        "-i",
        "/nonexistent/x.jsonl",
        "-o",
        o2.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("cannot read /nonexistent/x.jsonl"),
        "{err}"
    );
    let scored_bad = tmp.path().join("scored_bad.jsonl");
    std::fs::write(
        &scored_bad,
        "{\"text\": \"a\", \"auth_weight\": 0.5, \"prov_entropy\": 1}\n{\"text\": \"b\", \"auth_weight\": 2, \"prov_entropy\": 1}\n",
    )
    .unwrap();
    let (ok, _, err) = run(&[
        "prepare",
        "-i",
        scored_bad.to_str().unwrap(),
        "-o",
        o2.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("scored_bad.jsonl:2: `auth_weight` 2 is outside [0, 0.99]"),
        "{err}"
    );
    assert!(!o2.exists(), "nothing written for bad input");
    // A plot named as one of the data files it writes.
    let plot = o2.join("valid.jsonl");
    let (ok, _, err) = run(&[
        "prepare",
        "-i",
        corpus().to_str().unwrap(),
        "-o",
        o2.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("is one of the data files this writes"),
        "{err}"
    );
    assert!(!o2.exists(), "nothing written for a bad --plot");
}

/// `score` and `prepare` write the user's rows back with the scores set and every other value
/// as it was written: an id past 64 bits stayed a number, but as `1e+20`.
#[test]
fn score_and_prepare_keep_every_other_value_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("raw.jsonl");
    let rows = [
        r#"{"id": 99999999999999999999, "text": "The 1850 survey of the river, by hand.", "n": 1e2}"#,
        r#"{"id":18446744073709551616,"text":"Experts agree, as widely reported today.","auth_weight":0.5}"#,
    ];
    std::fs::write(&input, rows.join("\n") + "\n").unwrap();
    let scored = tmp.path().join("scored.jsonl");
    let (ok, _, err) = run(&[
        "score",
        "-i",
        input.to_str().unwrap(),
        "-o",
        scored.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&scored).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(r#"{"id":99999999999999999999,"text":"#),
        "{text}"
    );
    assert!(lines[0].contains(r#","n":1e2,"auth_weight":"#), "{text}");
    // A score the row carried is replaced where it was.
    assert!(lines[1].contains(r#"today.","auth_weight":"#), "{text}");
    assert!(!lines[1].contains(r#""auth_weight":0.5,"#), "{text}");

    // The scored rows, prepared: their scores carried, every value kept.
    let dir = tmp.path().join("prepared");
    let (ok, _, err) = run(&[
        "prepare",
        "--input",
        scored.to_str().unwrap(),
        "--output",
        dir.to_str().unwrap(),
        "--no-rebalance",
        "--valid-fraction",
        "0",
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
    let mut written: Vec<&str> = text.lines().collect();
    written.sort();
    let mut expected = lines.clone();
    expected.sort();
    assert_eq!(written, expected);
}
