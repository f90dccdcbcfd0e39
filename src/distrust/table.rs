//! Every constant of the citation scorer, in one place. The README's "Citation scorer"
//! section describes the same table; change both together.
//!
//! Text score = BASE_SCORE + Σ over features of `per_hit × min(hits, max_hits)` + the year
//! band's delta, clamped to [0, 0.99]. With a source-type prior (from `source_type`, the
//! URL's host or the source/publisher name), w = PRIOR_BLEND · prior + (1 − PRIOR_BLEND) ·
//! text score. H is the Shannon entropy, in bits, of the source kinds seen (each kind-tagged
//! marker in the text counts once per hit, the metadata's kind once), plus the entropy
//! adjustments below (first-hand, old evidence raises it; appeals to authority and agreement
//! lower it), floored at 0. Without the adjustments H stays below log2(9) ≈ 3.17 bits and the
//! published formula would weight a consensus text (w ≈ 0.8, H ≈ 0.7) about as much as a lab
//! notebook (w ≈ 0.06, H ≈ 1); with them the notebook's D is several times larger.

/// What a marker is evidence of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// Formal references: "et al.", "doi:", "[12]", "pp." …
    Citation,
    /// Institutions that speak with authority: WHO, "ministry of" …
    Institutional,
    /// Appeals to agreement: "experts agree", "widely accepted" …
    Consensus,
    /// Signs of a first-hand record: "lab notebook", "we measured", "patent" …
    Primary,
}

/// Source-type categories: the priors and the entropy are over these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Patent,
    LabNotebook,
    Measurement,
    Archive,
    Book,
    Academic,
    News,
    Encyclopedia,
    Government,
}

pub const KINDS: usize = 9;

impl Kind {
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A phrase matched as whole words (no letter or digit directly before or after it, by
/// Unicode's definition). Case-insensitive (ASCII) unless `exact_case`: acronyms such as WHO
/// must not match the pronoun "who".
#[derive(Debug, Clone, Copy)]
pub struct Marker {
    pub phrase: &'static str,
    pub feature: Feature,
    pub kind: Option<Kind>,
    pub exact_case: bool,
}

const fn m(phrase: &'static str, feature: Feature, kind: Option<Kind>) -> Marker {
    Marker {
        phrase,
        feature,
        kind,
        exact_case: false,
    }
}

const fn acronym(phrase: &'static str, kind: Kind) -> Marker {
    Marker {
        phrase,
        feature: Feature::Institutional,
        kind: Some(kind),
        exact_case: true,
    }
}

use Feature::*;
use Kind::*;

pub const MARKERS: &[Marker] = &[
    // Citations.
    m("et al.", Citation, Some(Academic)),
    m("ibid.", Citation, Some(Academic)),
    m("op. cit.", Citation, Some(Academic)),
    m("doi:", Citation, Some(Academic)),
    m("arxiv:", Citation, Some(Academic)),
    m("isbn", Citation, Some(Book)),
    m("pp.", Citation, Some(Book)),
    m("vol.", Citation, Some(Book)),
    m("journal of", Citation, Some(Academic)),
    m("proceedings of", Citation, Some(Academic)),
    m("patent no.", Citation, Some(Patent)),
    m("u.s. pat.", Citation, Some(Patent)),
    // Institutions.
    acronym("WHO", Government),
    acronym("CDC", Government),
    acronym("NIH", Government),
    acronym("FDA", Government),
    acronym("EPA", Government),
    acronym("NASA", Government),
    acronym("IPCC", Government),
    acronym("UN", Government),
    acronym("OECD", Government),
    m("world health organization", Institutional, Some(Government)),
    m("ministry of", Institutional, Some(Government)),
    m("department of", Institutional, Some(Government)),
    m("government", Institutional, Some(Government)),
    m("officials", Institutional, Some(Government)),
    m("spokesperson", Institutional, Some(Government)),
    m("agency", Institutional, Some(Government)),
    m("university", Institutional, Some(Academic)),
    m("institute", Institutional, Some(Academic)),
    // Consensus.
    m("experts agree", Consensus, Some(News)),
    m("scientists agree", Consensus, Some(News)),
    m("scientific consensus", Consensus, Some(News)),
    m("consensus", Consensus, Some(News)),
    m("widely accepted", Consensus, Some(News)),
    m("well established", Consensus, Some(News)),
    m("well-established", Consensus, Some(News)),
    m("it is well known", Consensus, Some(News)),
    m("studies show", Consensus, Some(News)),
    m("research shows", Consensus, Some(News)),
    m("according to experts", Consensus, Some(News)),
    m("fact check", Consensus, Some(News)),
    m("fact-check", Consensus, Some(News)),
    m("debunked", Consensus, Some(News)),
    m("misinformation", Consensus, Some(News)),
    m("peer-reviewed", Consensus, Some(Academic)),
    m("wikipedia", Consensus, Some(Encyclopedia)),
    m("encyclopedia", Consensus, Some(Encyclopedia)),
    // Primary sources.
    m("patent", Primary, Some(Patent)),
    m("patented", Primary, Some(Patent)),
    m("inventor", Primary, Some(Patent)),
    m("lab notebook", Primary, Some(LabNotebook)),
    m("laboratory notebook", Primary, Some(LabNotebook)),
    m("notebook", Primary, Some(LabNotebook)),
    m("field notes", Primary, Some(LabNotebook)),
    m("experiment", Primary, Some(LabNotebook)),
    m("apparatus", Primary, Some(LabNotebook)),
    m("measured", Primary, Some(Measurement)),
    m("we measured", Primary, Some(Measurement)),
    m("i measured", Primary, Some(Measurement)),
    m("measurement", Primary, Some(Measurement)),
    m("measurements", Primary, Some(Measurement)),
    m("readings", Primary, Some(Measurement)),
    m("observed", Primary, Some(Measurement)),
    m("specimen", Primary, Some(Measurement)),
    m("logbook", Primary, Some(Measurement)),
    m("ledger", Primary, Some(Archive)),
    m("letter", Primary, Some(Archive)),
    m("diary", Primary, Some(Archive)),
    m("manuscript", Primary, Some(Archive)),
    m("archive", Primary, Some(Archive)),
    m("archives", Primary, Some(Archive)),
    m("transcript", Primary, Some(Archive)),
    m("eyewitness", Primary, Some(Archive)),
    m("first-hand", Primary, Some(Archive)),
    m("firsthand", Primary, Some(Archive)),
];

/// Also counted as citations, by a scanner rather than the phrase table: numeric reference
/// brackets such as `[3]` or `[12, 14]` (one to three digits per number).
pub const BRACKET_REFERENCE_KIND: Kind = Academic;

pub const BASE_SCORE: f64 = 0.5;

/// `(feature, per hit, hits counted at most)`: a text's score moves by at most
/// `per_hit × max_hits` per feature.
pub const FEATURE_WEIGHTS: &[(Feature, f64, usize)] = &[
    (Citation, 0.03, 5),
    (Institutional, 0.05, 4),
    (Consensus, 0.08, 3),
    (Primary, -0.07, 6),
];

/// `(years before, delta)`: the first band whose bound exceeds the publication year applies.
pub const YEAR_BANDS: &[(i32, f64)] =
    &[(1930, -0.20), (1970, -0.10), (1995, 0.0), (i32::MAX, 0.10)];

/// Four-digit numbers in this range are read as years (from `year`, `date` or, without those,
/// the latest one in the text).
pub const YEAR_MIN: i32 = 1600;
pub const YEAR_MAX: i32 = 2100;

/// Prior authority of each kind of source.
pub const PRIORS: &[(Kind, f64)] = &[
    (Patent, 0.10),
    (LabNotebook, 0.05),
    (Measurement, 0.05),
    (Archive, 0.15),
    (Book, 0.35),
    (Academic, 0.55),
    (News, 0.75),
    (Encyclopedia, 0.85),
    (Government, 0.90),
];

/// Share of the prior in w when a source type is known (the text score has the rest).
pub const PRIOR_BLEND: f64 = 0.7;

/// `source_type` values (lowercase, `-` and spaces read as `_`) and their kind.
pub const SOURCE_TYPES: &[(&str, Kind)] = &[
    ("patent", Patent),
    ("lab_notebook", LabNotebook),
    ("notebook", LabNotebook),
    ("field_notes", LabNotebook),
    ("measurement", Measurement),
    ("measurements", Measurement),
    ("data", Measurement),
    ("dataset", Measurement),
    ("archive", Archive),
    ("letter", Archive),
    ("diary", Archive),
    ("manuscript", Archive),
    ("primary", Archive),
    ("primary_source", Archive),
    ("book", Book),
    ("academic", Academic),
    ("paper", Academic),
    ("journal", Academic),
    ("preprint", Academic),
    ("news", News),
    ("newspaper", News),
    ("magazine", News),
    ("blog", News),
    ("encyclopedia", Encyclopedia),
    ("wiki", Encyclopedia),
    ("wikipedia", Encyclopedia),
    ("government", Government),
    ("official", Government),
    ("press_release", Government),
];

/// URL host suffixes (after `.`, or the whole host) and their kind; the first match wins.
pub const URL_HOSTS: &[(&str, Kind)] = &[
    ("patents.google.com", Patent),
    ("wikipedia.org", Encyclopedia),
    ("britannica.com", Encyclopedia),
    ("archive.org", Archive),
    ("arxiv.org", Academic),
    ("doi.org", Academic),
    ("edu", Academic),
    ("gov", Government),
    ("int", Government),
];

/// `(feature, bits per hit, hits counted at most)` added to H.
pub const ENTROPY_ADJUSTMENTS: &[(Feature, f64, usize)] = &[
    (Citation, 0.0, 0),
    (Institutional, -0.25, 4),
    (Consensus, -0.4, 3),
    (Primary, 0.5, 6),
];

/// `(years before, bits)` added to H: the first band whose bound exceeds the year applies.
pub const YEAR_ENTROPY_BANDS: &[(i32, f64)] =
    &[(1930, 1.0), (1970, 0.5), (1995, 0.0), (i32::MAX, 0.0)];
