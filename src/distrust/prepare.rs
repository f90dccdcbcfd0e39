//! Corpus preparation for distrust training: score what is not scored, drop exact and
//! near-exact duplicates, rebalance toward a share of low-authority examples, split into
//! train and valid by seed. Every step is a pure function of the input and the seed.

use super::formula::{read_provenance, Provenance, AUTH_WEIGHT, PROV_ENTROPY};
use super::{scorer, DistrustError};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;
use std::collections::HashSet;

/// The original aimed at 25–30 % low-authority examples; the middle of that range.
pub const DEFAULT_LOW_AUTHORITY_SHARE: f64 = 0.28;
/// Examples with `auth_weight` below this count as low-authority.
pub const LOW_AUTHORITY_BELOW: f64 = 0.3;

/// One row with its scores and where it came from.
#[derive(Debug, Clone)]
pub struct Example {
    /// The row as it will be written: as it was read, with its scores set.
    pub line: String,
    pub prov: Provenance,
    pub location: String,
    pub text: String,
}

impl Example {
    pub fn is_low_authority(&self) -> bool {
        self.prov.auth_weight < LOW_AUTHORITY_BELOW
    }
}

/// Turns records (each with its line as read) into examples, scoring rows that carry no
/// scores (rows that carry them are checked and kept). Returns the examples and how many were
/// scored here.
pub fn examples(
    records: Vec<(crate::data::Record, String)>,
) -> Result<(Vec<Example>, usize), DistrustError> {
    let mut out = Vec::with_capacity(records.len());
    let mut errors = vec![];
    let mut scored = 0;
    for (r, line) in records {
        let Some(text) = scorer::row_text(&r.fields) else {
            errors.push(format!(
                "{}: no text: expected `text`, `prompt`/`completion` or `messages`",
                r.location
            ));
            continue;
        };
        let prov = match read_provenance(&r) {
            Ok(Some(p)) => p,
            Ok(None) => match scorer::score_row(&r.fields) {
                Ok(s) => {
                    scored += 1;
                    Provenance {
                        auth_weight: s.auth_weight,
                        prov_entropy: s.prov_entropy,
                    }
                }
                Err(e) => {
                    errors.push(format!("{}: {e}", r.location));
                    continue;
                }
            },
            Err(e) => {
                errors.push(format!("{}: {e}", r.location));
                continue;
            }
        };
        let scores = [
            (AUTH_WEIGHT, json!(prov.auth_weight)),
            (PROV_ENTROPY, json!(prov.prov_entropy)),
        ];
        let line = match crate::data::row_fields::with_fields(&line, &scores) {
            Ok(l) => l,
            Err(e) => {
                errors.push(format!("{}: {e}", r.location));
                continue;
            }
        };
        out.push(Example {
            line,
            prov,
            location: r.location,
            text,
        });
    }
    if errors.is_empty() {
        Ok((out, scored))
    } else {
        Err(DistrustError::rows(errors))
    }
}

/// The text reduced to its words: lowercase letters and digits, single spaces. Texts that
/// differ only in case, punctuation or spacing are near-exact duplicates.
pub fn normalized(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// Words per shingle for the near-duplicate check.
const SHINGLE_WORDS: usize = 3;
/// Two texts whose word-shingle sets have at least this Jaccard similarity are near-exact
/// duplicates (one changed word in forty words gives about 0.85).
pub const NEAR_JACCARD: f64 = 0.8;
/// Min-hash signature: BANDS bands of ROWS hashes; texts sharing a band are compared exactly.
const BANDS: usize = 8;
const ROWS: usize = 4;

/// FNV-1a: a fixed, platform-independent hash, so the result never depends on the build.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes of the text's `SHINGLE_WORDS`-word windows (of its normalized words).
fn shingles(norm: &str) -> HashSet<u64> {
    let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
    words
        .windows(SHINGLE_WORDS)
        .map(|w| fnv1a(w.join(" ").as_bytes(), 0))
        .collect()
}

fn jaccard(a: &HashSet<u64>, b: &HashSet<u64>) -> f64 {
    let inter = a.intersection(b).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Keeps the first of each group of duplicates; returns (kept, exact dropped, near dropped).
/// Exact: the same text. Near-exact: the same text after [`normalized`], or word-shingle
/// Jaccard similarity ≥ [`NEAR_JACCARD`] with a kept text (candidates found by min-hash
/// banding, then checked exactly).
pub fn dedupe(examples: Vec<Example>) -> (Vec<Example>, usize, usize) {
    let mut exact = HashSet::new();
    let mut near = HashSet::new();
    let mut buckets: std::collections::HashMap<(usize, u64), Vec<usize>> = Default::default();
    let mut kept_shingles: Vec<HashSet<u64>> = vec![];
    let (mut n_exact, mut n_near) = (0, 0);
    let mut kept = Vec::with_capacity(examples.len());
    for e in examples {
        if !exact.insert(e.text.clone()) {
            n_exact += 1;
            continue;
        }
        let norm = normalized(&e.text);
        let sh = shingles(&norm);
        if !near.insert(norm) {
            n_near += 1;
            continue;
        }
        let mut keys = vec![];
        if !sh.is_empty() {
            let sig: Vec<u64> = (0..BANDS * ROWS)
                .map(|k| {
                    let seed = mix(k as u64 + 1);
                    sh.iter().map(|&s| mix(s ^ seed)).min().unwrap_or(0)
                })
                .collect();
            keys = sig
                .chunks(ROWS)
                .enumerate()
                .map(|(band, rows)| {
                    let bytes: Vec<u8> = rows.iter().flat_map(|r| r.to_le_bytes()).collect();
                    (band, fnv1a(&bytes, band as u64))
                })
                .collect();
            let similar = keys
                .iter()
                .filter_map(|k| buckets.get(k))
                .flatten()
                .any(|&j| jaccard(&sh, &kept_shingles[j]) >= NEAR_JACCARD);
            if similar {
                n_near += 1;
                continue;
            }
        }
        let idx = kept_shingles.len();
        for k in keys {
            buckets.entry(k).or_default().push(idx);
        }
        kept_shingles.push(sh);
        kept.push(e);
    }
    (kept, n_exact, n_near)
}

/// Drops examples of the over-represented side (low or high authority), chosen by `seed`,
/// until low-authority examples make up `share` of the set (as near as whole examples
/// allow; never duplicates anything, never empties a side). Keeps the input order. Returns the
/// kept examples and a note when the target cannot be reached.
pub fn rebalance(examples: Vec<Example>, share: f64, seed: u64) -> (Vec<Example>, Option<String>) {
    let low = examples.iter().filter(|e| e.is_low_authority()).count();
    let high = examples.len() - low;
    if low == 0 || high == 0 {
        let note = format!(
            "no rebalancing: all {} examples are {}-authority (auth_weight {} {LOW_AUTHORITY_BELOW})",
            examples.len(),
            if low == 0 { "high" } else { "low" },
            if low == 0 { "≥" } else { "<" },
        );
        return (examples, Some(note));
    }
    // Keep every example of the rarer side, and as many of the other as the share allows.
    let (drop_low, keep) = if (low as f64) / (examples.len() as f64) > share {
        (
            true,
            ((high as f64) * share / (1.0 - share)).round().max(1.0) as usize,
        )
    } else {
        (
            false,
            ((low as f64) * (1.0 - share) / share).round().max(1.0) as usize,
        )
    };
    let mut side: Vec<usize> = (0..examples.len())
        .filter(|&i| examples[i].is_low_authority() == drop_low)
        .collect();
    if keep >= side.len() {
        return (examples, None);
    }
    side.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let dropped: HashSet<usize> = side[keep..].iter().copied().collect();
    let kept = examples
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !dropped.contains(i))
        .map(|(_, e)| e)
        .collect();
    (kept, None)
}

/// Splits into (train, valid): `valid_fraction` of the examples (at least one when the
/// fraction is above 0 and there are two or more), drawn by `seed`; order within each part is
/// the input order.
pub fn split(
    examples: Vec<Example>,
    valid_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    let mut n_valid = (n as f64 * valid_fraction).round() as usize;
    if valid_fraction > 0.0 && n >= 2 {
        n_valid = n_valid.max(1);
    }
    n_valid = n_valid.min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1)));
    let valid_set: HashSet<usize> = order[..n_valid].iter().copied().collect();
    let (mut train, mut valid) = (vec![], vec![]);
    for (i, e) in examples.into_iter().enumerate() {
        if valid_set.contains(&i) {
            valid.push(e);
        } else {
            train.push(e);
        }
    }
    (train, valid)
}

/// Counts of `values` in `bins` equal bins over [lo, hi] (values outside go to the end bins).
pub fn histogram(values: &[f64], bins: usize, lo: f64, hi: f64) -> Vec<usize> {
    let mut h = vec![0; bins.max(1)];
    let width = (hi - lo) / h.len() as f64;
    for &v in values {
        let i = if width > 0.0 {
            // The nudge puts an edge value in the bin it starts (0.3 / 0.1 is 2.9999…).
            ((v - lo) / width + 1e-9).floor().max(0.0) as usize
        } else {
            0
        };
        let last = h.len() - 1;
        h[i.min(last)] += 1;
    }
    h
}

/// A histogram as terminal lines: `  0.00–0.10 | ######## 8`.
pub fn render_histogram(title: &str, counts: &[usize], lo: f64, hi: f64) -> String {
    const WIDTH: usize = 40;
    let max = counts.iter().copied().max().unwrap_or(0).max(1);
    let width = (hi - lo) / counts.len().max(1) as f64;
    let mut s = format!("{title}\n");
    for (i, &c) in counts.iter().enumerate() {
        let a = lo + width * i as f64;
        let bar = "#".repeat((c * WIDTH).div_ceil(max));
        s.push_str(&format!("  {a:5.2}–{:5.2} | {bar} {c}\n", a + width));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str, w: f64) -> Example {
        Example {
            line: String::new(),
            prov: Provenance {
                auth_weight: w,
                prov_entropy: 0.0,
            },
            location: String::new(),
            text: text.into(),
        }
    }

    #[test]
    fn duplicates_exact_and_near_are_dropped_keeping_the_first() {
        let (kept, exact, near) = dedupe(vec![
            ex("The Cat sat.", 0.1),
            ex("The Cat sat.", 0.2),
            ex("the  cat, SAT", 0.3),
            ex("Über café", 0.4),
            ex("über CAFÉ!", 0.5),
            ex("The cat sat on the mat.", 0.6),
        ]);
        assert_eq!((exact, near), (1, 2));
        let w: Vec<f64> = kept.iter().map(|e| e.prov.auth_weight).collect();
        assert_eq!(w, vec![0.1, 0.4, 0.6]);
    }

    #[test]
    fn texts_one_word_apart_are_near_duplicates_and_different_ones_are_not() {
        let base: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
        let mut one_off = base.clone();
        one_off[20] = "changed".into();
        let mut five_off = base.clone();
        for i in [3, 11, 19, 27, 35] {
            five_off[i] = format!("x{i}");
        }
        let other: Vec<String> = (0..40).map(|i| format!("v{i}")).collect();
        let (kept, exact, near) = dedupe(vec![
            ex(&base.join(" "), 0.1),
            ex(&one_off.join(" "), 0.2),
            ex(&five_off.join(" "), 0.3),
            ex(&other.join(" "), 0.4),
        ]);
        assert_eq!((exact, near), (0, 1));
        let w: Vec<f64> = kept.iter().map(|e| e.prov.auth_weight).collect();
        assert_eq!(w, vec![0.1, 0.3, 0.4]);
        // Shingle Jaccard of the one-word change: 35 shared of 41.
        let (a, b) = (
            shingles(&normalized(&base.join(" "))),
            shingles(&normalized(&one_off.join(" "))),
        );
        assert!((jaccard(&a, &b) - 35.0 / 41.0).abs() < 1e-12);
    }

    #[test]
    fn rebalancing_reaches_the_share_and_is_seeded() {
        // 10 low, 90 high → keep all 10 low and round(10 × 0.72 / 0.28) = 26 high.
        let all: Vec<Example> = (0..100)
            .map(|i| ex(&format!("t{i}"), if i % 10 == 0 { 0.1 } else { 0.8 }))
            .collect();
        let (kept, note) = rebalance(all.clone(), 0.28, 1);
        assert!(note.is_none());
        let low = kept.iter().filter(|e| e.is_low_authority()).count();
        assert_eq!((low, kept.len()), (10, 36));
        let texts = |v: &[Example]| v.iter().map(|e| e.text.clone()).collect::<Vec<_>>();
        assert_eq!(texts(&kept), texts(&rebalance(all.clone(), 0.28, 1).0));
        assert_ne!(texts(&kept), texts(&rebalance(all.clone(), 0.28, 2).0));
        // Too many low: 90 low / 10 high at share 0.25 → round(10 × 0.25 / 0.75) = 3 low kept.
        let flipped: Vec<Example> = all
            .iter()
            .map(|e| ex(&e.text, 0.9 - e.prov.auth_weight))
            .collect();
        let (kept, _) = rebalance(flipped, 0.25, 1);
        assert_eq!(kept.iter().filter(|e| e.is_low_authority()).count(), 3);
        let (kept, note) = rebalance(vec![ex("a", 0.9), ex("b", 0.8)], 0.28, 1);
        assert_eq!(kept.len(), 2);
        assert!(note.unwrap().contains("all 2 examples are high-authority"));
    }

    #[test]
    fn split_holds_out_the_fraction_by_seed() {
        let all: Vec<Example> = (0..20).map(|i| ex(&format!("t{i}"), 0.5)).collect();
        let (t, v) = split(all.clone(), 0.1, 3);
        assert_eq!((t.len(), v.len()), (18, 2));
        let (_, v2) = split(all.clone(), 0.1, 4);
        assert_ne!(
            v[0].text.clone() + &v[1].text,
            v2[0].text.clone() + &v2[1].text
        );
        assert_eq!(split(all[..2].to_vec(), 0.1, 3).1.len(), 1);
        assert_eq!(split(all[..1].to_vec(), 0.5, 3).1.len(), 0);
        assert_eq!(split(all, 0.0, 3).1.len(), 0);
    }

    #[test]
    fn histograms_bin_and_render() {
        let h = histogram(&[0.0, 0.05, 0.5, 0.99, 1.0, -1.0], 10, 0.0, 1.0);
        assert_eq!(h, vec![3, 0, 0, 0, 0, 1, 0, 0, 0, 2]);
        let s = render_histogram("w", &h, 0.0, 1.0);
        assert!(
            s.contains(" 0.00– 0.10 | ######################################## 3"),
            "{s}"
        );
        assert_eq!(histogram(&[2.0], 4, 1.0, 1.0), vec![1, 0, 0, 0]);
        // Edges start their bin, as the low-authority count (< 0.3) reads them.
        let h = histogram(&[0.3, 0.7, 0.6], 10, 0.0, 1.0);
        assert_eq!((h[2], h[3], h[6], h[7]), (0, 1, 1, 1));
    }
}
