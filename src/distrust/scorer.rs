//! The citation scorer: authority weight `w` and provenance entropy `H` of a text and its
//! metadata, from the constants in [`super::table`].
//!
//! One pass of one Aho–Corasick automaton (built once) finds every marker phrase; a match
//! counts only as a whole word (the characters around it are not letters or digits, in
//! Unicode's sense) and, for acronyms, with its exact case. Match positions are always UTF-8
//! character boundaries because every phrase is ASCII, so no text is ever sliced inside a
//! character. The result is a pure function of the input.

use super::formula::MAX_AUTH_WEIGHT;
use super::table::{
    Feature, Kind, BASE_SCORE, BRACKET_REFERENCE_KIND, ENTROPY_ADJUSTMENTS, FEATURE_WEIGHTS, KINDS,
    MARKERS, PRIORS, PRIOR_BLEND, SOURCE_TYPES, URL_HOSTS, YEAR_BANDS, YEAR_ENTROPY_BANDS,
    YEAR_MAX, YEAR_MIN,
};
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde_json::{Map, Value};
use std::sync::LazyLock;

static AUTOMATON: LazyLock<AhoCorasick> = LazyLock::new(|| {
    AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::LeftmostLongest)
        .build(MARKERS.iter().map(|m| m.phrase))
        .expect("the marker table builds an automaton")
});

/// Optional metadata of a row.
#[derive(Debug, Clone, Default)]
pub struct Metadata<'a> {
    pub source: Option<&'a str>,
    pub url: Option<&'a str>,
    pub publisher: Option<&'a str>,
    pub year: Option<i32>,
    pub source_type: Option<&'a str>,
}

/// Marker hits of a text, by feature and by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub citation: usize,
    pub institutional: usize,
    pub consensus: usize,
    pub primary: usize,
    pub kinds: [usize; KINDS],
    /// The latest year written in the text.
    pub latest_year: Option<i32>,
}

impl Counts {
    fn feature(&self, f: Feature) -> usize {
        match f {
            Feature::Citation => self.citation,
            Feature::Institutional => self.institutional,
            Feature::Consensus => self.consensus,
            Feature::Primary => self.primary,
        }
    }

    fn add(&mut self, f: Feature, kind: Option<Kind>) {
        match f {
            Feature::Citation => self.citation += 1,
            Feature::Institutional => self.institutional += 1,
            Feature::Consensus => self.consensus += 1,
            Feature::Primary => self.primary += 1,
        }
        if let Some(k) = kind {
            self.kinds[k.index()] += 1;
        }
    }
}

/// The scorer's answer, with the parts it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub auth_weight: f64,
    pub prov_entropy: f64,
    pub text_score: f64,
    /// The kind of source the metadata names, if any.
    pub source_kind: Option<Kind>,
    pub year: Option<i32>,
    pub counts: Counts,
}

fn is_word_char(c: Option<char>) -> bool {
    c.is_some_and(char::is_alphanumeric)
}

/// Counts whole-word marker hits, numeric reference brackets and the latest year in `text`.
pub fn count(text: &str) -> Counts {
    let mut c = Counts::default();
    for hit in AUTOMATON.find_iter(text) {
        let marker = &MARKERS[hit.pattern().as_usize()];
        let (start, end) = (hit.start(), hit.end());
        let phrase = marker.phrase.as_bytes();
        // Boundaries matter only where the phrase itself begins or ends with a word character.
        if phrase[0].is_ascii_alphanumeric() && is_word_char(text[..start].chars().next_back()) {
            continue;
        }
        if phrase[phrase.len() - 1].is_ascii_alphanumeric()
            && is_word_char(text[end..].chars().next())
        {
            continue;
        }
        if marker.exact_case && &text.as_bytes()[start..end] != phrase {
            continue;
        }
        c.add(marker.feature, marker.kind);
    }
    scan_numbers(text.as_bytes(), &mut c);
    c
}

/// Bracketed reference numbers (`[3]`, `[12, 14]`) and standalone four-digit years.
fn scan_numbers(b: &[u8], c: &mut Counts) {
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let len = i - start;
        let before = start.checked_sub(1).map(|p| b[p]);
        let after = b.get(i).copied();
        // A year: four digits not part of a word or of a longer number (3.1887, 1,887, 1887.5).
        let glued_before =
            before.is_some_and(|x| x.is_ascii_alphanumeric() || x == b'.' || x == b',');
        let glued_after = after.is_some_and(|x| {
            x.is_ascii_alphanumeric()
                || ((x == b'.' || x == b',') && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        });
        if len == 4 && !glued_before && !glued_after {
            let y = b[start..i]
                .iter()
                .fold(0i32, |acc, d| acc * 10 + (d - b'0') as i32);
            if (YEAR_MIN..=YEAR_MAX).contains(&y) {
                c.latest_year = Some(c.latest_year.map_or(y, |l| l.max(y)));
            }
        }
        // A reference: `[` digits (`,` or `-` digits)* `]`, counted once at its first number.
        if len <= 3 && before == Some(b'[') {
            let mut j = i;
            let mut ok = true;
            while j < b.len() && b[j] != b']' {
                let ch = b[j];
                if !(ch.is_ascii_digit() || ch == b',' || ch == b'-' || ch == b' ') || j - i > 24 {
                    ok = false;
                    break;
                }
                j += 1;
            }
            if ok && j < b.len() {
                c.add(Feature::Citation, Some(BRACKET_REFERENCE_KIND));
                i = j;
            }
        }
    }
}

/// The year band's delta for a publication year.
pub fn year_delta(year: i32) -> f64 {
    YEAR_BANDS
        .iter()
        .find(|(bound, _)| year < *bound)
        .map_or(0.0, |b| b.1)
}

/// BASE_SCORE + feature contributions + year delta, clamped to [0, 0.99].
pub fn text_score(c: &Counts, year: Option<i32>) -> f64 {
    let mut s = BASE_SCORE;
    for &(f, per_hit, max_hits) in FEATURE_WEIGHTS {
        s += per_hit * c.feature(f).min(max_hits) as f64;
    }
    if let Some(y) = year {
        s += year_delta(y);
    }
    s.clamp(0.0, MAX_AUTH_WEIGHT)
}

/// Bits added to the kinds' Shannon entropy for the features and the year.
pub fn entropy_adjustment(c: &Counts, year: Option<i32>) -> f64 {
    let mut bits = 0.0;
    for &(f, per_hit, max_hits) in ENTROPY_ADJUSTMENTS {
        bits += per_hit * c.feature(f).min(max_hits) as f64;
    }
    if let Some(y) = year {
        bits += YEAR_ENTROPY_BANDS
            .iter()
            .find(|(bound, _)| y < *bound)
            .map_or(0.0, |b| b.1);
    }
    bits
}

pub fn prior(kind: Kind) -> f64 {
    PRIORS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(BASE_SCORE, |p| p.1)
}

/// The kind a `source_type` value names (lowercase; `-` and spaces read as `_`).
pub fn kind_of_source_type(s: &str) -> Option<Kind> {
    let norm: String = s
        .trim()
        .chars()
        .map(|c| match c {
            '-' | ' ' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    SOURCE_TYPES
        .iter()
        .find(|(name, _)| *name == norm)
        .map(|p| p.1)
}

/// The kind a URL's host names: the first table suffix it ends with (a one-label suffix such
/// as `gov` matches any label of the host, so `agency.gov.uk` too).
pub fn kind_of_url(url: &str) -> Option<Kind> {
    let rest = url.split_once("://").map_or(url, |p| p.1);
    let host = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .rsplit('@')
        .next()
        .unwrap_or("")
        .split(':')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    URL_HOSTS
        .iter()
        .find(|(suffix, _)| {
            if suffix.contains('.') {
                host == *suffix || host.ends_with(&format!(".{suffix}"))
            } else {
                host.split('.').skip(1).any(|label| label == *suffix)
            }
        })
        .map(|p| p.1)
}

/// The kind a source or publisher name suggests: that of its first kind-tagged marker.
pub fn kind_of_name(name: &str) -> Option<Kind> {
    let c = count(name);
    // The most frequent kind, ties to the first in table order: deterministic.
    let (i, n) = c
        .kinds
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
    (*n > 0).then(|| ALL_KINDS[i])
}

const ALL_KINDS: [Kind; KINDS] = [
    Kind::Patent,
    Kind::LabNotebook,
    Kind::Measurement,
    Kind::Archive,
    Kind::Book,
    Kind::Academic,
    Kind::News,
    Kind::Encyclopedia,
    Kind::Government,
];

/// Shannon entropy in bits of a distribution given by counts (0 for none).
pub fn entropy_bits(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let h: f64 = counts
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| {
            let p = n as f64 / total as f64;
            -p * p.log2()
        })
        .sum();
    // −Σ p log p of one category is −0.0; report 0.
    h.max(0.0)
}

/// Scores a text with its metadata.
pub fn score(text: &str, meta: &Metadata) -> Score {
    let counts = count(text);
    let source_kind = meta
        .source_type
        .and_then(kind_of_source_type)
        .or_else(|| meta.url.and_then(kind_of_url))
        .or_else(|| meta.publisher.and_then(kind_of_name))
        .or_else(|| meta.source.and_then(kind_of_name));
    let year = meta.year.or(counts.latest_year);
    let ts = text_score(&counts, year);
    let w = match source_kind {
        Some(k) => PRIOR_BLEND * prior(k) + (1.0 - PRIOR_BLEND) * ts,
        None => ts,
    };
    let mut kinds = counts.kinds;
    if let Some(k) = source_kind {
        kinds[k.index()] += 1;
    }
    Score {
        auth_weight: w.clamp(0.0, MAX_AUTH_WEIGHT),
        prov_entropy: (entropy_bits(&kinds) + entropy_adjustment(&counts, year)).max(0.0),
        text_score: ts,
        source_kind,
        year,
        counts,
    }
}

/// A year from a JSON value: a number, or the first four-digit run of a string ("1887-03-02").
fn year_of(v: &Value) -> Option<i32> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
            .filter(|y| (YEAR_MIN as i64..=YEAR_MAX as i64).contains(y))
            .map(|y| y as i32),
        Value::String(s) => {
            let b = s.as_bytes();
            (0..b.len().saturating_sub(3)).find_map(|i| {
                let digits = &b[i..i + 4];
                let alone = (i == 0 || !b[i - 1].is_ascii_digit())
                    && b.get(i + 4).is_none_or(|c| !c.is_ascii_digit());
                if alone && digits.iter().all(u8::is_ascii_digit) {
                    let y = digits.iter().fold(0i32, |a, d| a * 10 + (d - b'0') as i32);
                    (YEAR_MIN..=YEAR_MAX).contains(&y).then_some(y)
                } else {
                    None
                }
            })
        }
        _ => None,
    }
}

/// The text a row is scored on: `text`, else prompt and completion, else every message's
/// string content, joined by newlines.
pub fn row_text(fields: &Map<String, Value>) -> Option<String> {
    if let Some(Value::String(t)) = fields.get("text") {
        return Some(t.clone());
    }
    let mut parts: Vec<&str> = vec![];
    for key in ["prompt", "completion"] {
        if let Some(Value::String(s)) = fields.get(key) {
            parts.push(s);
        }
    }
    if let Some(Value::Array(msgs)) = fields.get("messages") {
        for m in msgs {
            if let Some(Value::String(s)) = m.get("content") {
                parts.push(s);
            }
        }
    }
    (!parts.is_empty()).then(|| parts.join("\n"))
}

/// Scores one JSONL row (its text and the metadata fields it has); the error is the reason.
pub fn score_row(fields: &Map<String, Value>) -> Result<Score, String> {
    let text = row_text(fields).ok_or_else(|| {
        "no text to score: expected `text`, `prompt`/`completion` or `messages`".to_string()
    })?;
    let string = |k: &str| -> Result<Option<&str>, String> {
        match fields.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(format!("`{k}` must be a string, found {other}")),
        }
    };
    let meta = Metadata {
        source: string("source")?,
        url: string("url")?,
        publisher: string("publisher")?,
        source_type: string("source_type")?,
        year: fields
            .get("year")
            .and_then(year_of)
            .or_else(|| fields.get("date").and_then(year_of)),
    };
    Ok(score(&text, &meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn plain_text_scores_the_base_with_zero_entropy() {
        let s = score("The cat sat on the mat.", &Metadata::default());
        assert!(close(s.auth_weight, 0.5));
        assert_eq!(s.prov_entropy, 0.0);
    }

    #[test]
    fn each_feature_moves_the_score_by_its_table_weight() {
        let none = Metadata::default();
        // Citations: 2 hits × 0.03, both Academic: H = 0.
        let s = score("As Smith et al. showed [4], ...", &none);
        assert_eq!(s.counts.citation, 2);
        assert!(close(s.auth_weight, 0.5 + 0.06));
        assert_eq!(s.prov_entropy, 0.0);
        // Institutional: WHO and NIH, 2 × 0.05; both Government.
        let s = score("The WHO and the NIH said so.", &none);
        assert_eq!(s.counts.institutional, 2);
        assert!(close(s.auth_weight, 0.6));
        // One kind (0 bits), 2 × −0.25 bits: floored at 0.
        assert_eq!(s.prov_entropy, 0.0);
        // Consensus, capped at 3 hits: 5 × "experts agree" counts 3 × 0.08.
        let s = score(&"Experts agree. ".repeat(5), &none);
        assert_eq!(s.counts.consensus, 5);
        assert!(close(s.auth_weight, 0.5 + 0.24));
        // Primary: "lab notebook" (LabNotebook) and "we measured" (Measurement):
        // 2 × −0.07 = 0.36; two kinds, one hit each: 1 bit, + 2 × 0.5 bits = 2.
        let s = score("From the lab notebook: we measured 4 grams.", &none);
        assert_eq!(s.counts.primary, 2);
        assert!(close(s.auth_weight, 0.36));
        assert!(close(s.prov_entropy, 2.0));
        // Year in the text: 1887 < 1930 → −0.20, and +1 bit of H.
        let s = score("Written in 1887.", &none);
        assert_eq!(s.year, Some(1887));
        assert!(close(s.auth_weight, 0.30));
        assert!(close(s.prov_entropy, 1.0));
        // The latest year counts: 1850 and 2011 → ≥ 1995 → +0.10.
        assert!(close(
            score("In 1850, and again in 2011.", &none).auth_weight,
            0.6
        ));
    }

    #[test]
    fn metadata_priors_blend_70_30_and_count_in_the_entropy() {
        // source_type patent: 0.7 × 0.10 + 0.3 × 0.5 = 0.22; kinds {Patent: 1}: H = 0.
        let meta = Metadata {
            source_type: Some("Patent"),
            ..Default::default()
        };
        let s = score("A device.", &meta);
        assert!(close(s.auth_weight, 0.22));
        assert_eq!(s.prov_entropy, 0.0);
        // A .gov URL with a text that cites a diary: text 0.5 − 0.07 = 0.43;
        // w = 0.7 × 0.9 + 0.3 × 0.43 = 0.759; kinds {Archive: 1, Government: 1}: 1 bit,
        // + 0.5 for the primary marker: H = 1.5.
        let meta = Metadata {
            url: Some("https://www.health.gov/x?y=1"),
            ..Default::default()
        };
        let s = score("Her diary says otherwise.", &meta);
        assert!(close(s.auth_weight, 0.759), "{}", s.auth_weight);
        assert!(close(s.prov_entropy, 1.5));
        // Year from metadata wins over the text: 1901 → −0.20 (text says 2020).
        let meta = Metadata {
            year: Some(1901),
            ..Default::default()
        };
        assert!(close(score("Reprinted 2020.", &meta).auth_weight, 0.3));
        // Four kinds, one hit each: 2 bits; + 3 × 0.5 (primary) − 0.4 (consensus): H = 3.1.
        let s = score(
            "patent, notebook, diary and wikipedia",
            &Metadata::default(),
        );
        assert!(close(s.prov_entropy, 3.1));
        // Publisher names a kind through the marker table.
        let meta = Metadata {
            publisher: Some("World Health Organization"),
            ..Default::default()
        };
        assert_eq!(score("x", &meta).source_kind, Some(Kind::Government));
        assert_eq!(
            kind_of_url("http://en.wikipedia.org/wiki/X"),
            Some(Kind::Encyclopedia)
        );
        assert_eq!(
            kind_of_url("https://agency.gov.uk/"),
            Some(Kind::Government)
        );
        assert_eq!(kind_of_url("https://gov.example.com/"), None);
        assert_eq!(kind_of_source_type("lab-notebook"), Some(Kind::LabNotebook));
    }

    #[test]
    fn markers_match_whole_words_only() {
        let none = Metadata::default();
        for text in [
            "the whole thing",
            "who said it?",
            "Who knows.",
            "annihilate the nihilists",
            "unknown UNited",
            "patently absurd, the patents",
            "remeasured",
            "a letterbox",
            "happ. no",
        ] {
            let c = count(text);
            assert_eq!(
                (c.citation, c.institutional, c.consensus, c.primary),
                (0, 0, 0, 0),
                "{text}"
            );
        }
        let _ = score("", &none);
        assert_eq!(count("WHO, NIH; (UN)").institutional, 3);
        assert_eq!(
            count("Ärzte: WHOé").institutional,
            0,
            "Unicode letters are word characters"
        );
        assert_eq!(count("«WHO»").institutional, 1);
        assert_eq!(count("measured. Measured! MEASURED").primary, 3);
    }

    #[test]
    fn numbers_are_read_as_years_and_references_only_when_they_are() {
        assert_eq!(
            count("1,234,567 and 12345 and 3.1887 and 1887.5").latest_year,
            None
        );
        assert_eq!(count("In 1887, then 1901.").latest_year, Some(1901));
        assert_eq!(count("(1887)").latest_year, Some(1887));
        assert_eq!(count("year 2500").latest_year, None);
        assert_eq!(count("[1] [2, 3] [4-6] [a] [1234]").citation, 3);
    }

    #[test]
    fn rows_give_their_text_and_metadata() {
        let row: Map<String, Value> = serde_json::from_str(
            r#"{"prompt": "Q", "completion": "From my lab notebook", "date": "1887-03-02", "source_type": "notebook"}"#,
        )
        .unwrap();
        let s = score_row(&row).unwrap();
        assert_eq!(s.year, Some(1887));
        assert_eq!(s.source_kind, Some(Kind::LabNotebook));
        // text: 0.5 − 0.07 − 0.20 = 0.23; w = 0.7 × 0.05 + 0.3 × 0.23 = 0.104.
        assert!(close(s.auth_weight, 0.104), "{}", s.auth_weight);
        // One kind (marker + metadata): 0 bits; + 0.5 (primary) + 1 (before 1930): H = 1.5.
        assert!(close(s.prov_entropy, 1.5));
        let bad: Map<String, Value> = serde_json::from_str(r#"{"text": "x", "url": 3}"#).unwrap();
        assert!(score_row(&bad)
            .unwrap_err()
            .contains("`url` must be a string"));
        let empty: Map<String, Value> = serde_json::from_str(r#"{"title": "x"}"#).unwrap();
        assert!(score_row(&empty).unwrap_err().contains("no text"));
    }
}
