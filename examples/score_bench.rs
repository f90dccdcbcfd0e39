//! Throughput of the citation scorer on one core:
//! `cargo run --release --example score_bench [MEGABYTES]` prints MB/s.
//!
//! The text is the bundled example corpus's rows mixed with generated prose (some of it
//! non-ASCII), cut into rows of 200 bytes to 4 KB as a real corpus has; each row is scored
//! with its metadata as `your_ai score` does.

use rand::{Rng, SeedableRng};
use std::time::Instant;
use your_ai::distrust::scorer::score_row;

const WORDS: &[&str] = &[
    "the",
    "river",
    "measured",
    "officials",
    "said",
    "in",
    "1911",
    "experts",
    "agree",
    "that",
    "notebook",
    "whole",
    "annihilate",
    "WHO",
    "über",
    "café",
    "data",
    "were",
    "kept",
    "by",
    "hand",
    "[3]",
    "et al.",
    "consensus",
    "patent",
    "of",
    "a",
    "new",
    "valve",
    "日本",
    "and",
];

fn main() {
    let mb: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let corpus = include_str!("distrust/raw.jsonl");
    let seeds: Vec<serde_json::Map<String, serde_json::Value>> = corpus
        .lines()
        .map(|l| serde_json::from_str(l).expect("bundled corpus parses"))
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut rows = vec![];
    let mut bytes = 0;
    while bytes < mb << 20 {
        let mut row = seeds[rng.random_range(0..seeds.len())].clone();
        let target = rng.random_range(200..4096);
        let mut text = row["text"].as_str().unwrap_or("").to_string();
        while text.len() < target {
            text.push(' ');
            text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
        bytes += text.len();
        row.insert("text".into(), text.into());
        rows.push(row);
    }
    // Warm up (builds the automaton once).
    let _ = score_row(&rows[0]);
    let start = Instant::now();
    let mut checksum = 0.0;
    for r in &rows {
        let s = score_row(r).expect("rows have text");
        checksum += s.auth_weight + s.prov_entropy;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "citation scorer: {} rows, {:.1} MB of text in {:.3} s on one thread: {:.1} MB/s (checksum {checksum:.3})",
        rows.len(),
        bytes as f64 / 1e6,
        secs,
        bytes as f64 / 1e6 / secs
    );
}
