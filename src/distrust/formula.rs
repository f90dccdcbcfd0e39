//! The distrust weight of each training example.
//!
//! The published formula gives each example D = α · (ln(1 − w + 1e-8) + H)², with `w` its
//! authority weight and `H` its provenance entropy. Both are constants of the data, so adding
//! λ·mean(D) to the loss (as the first implementation did) has zero gradient: it changes the
//! printed loss and nothing that is learned. Here D scales each example's cross-entropy
//! instead: c_i = (1 − λ) + λ · D_i / D̄, with D̄ the mean D over the whole training set
//! (computed once, so an example's weight does not depend on which batch it lands in), and the
//! loss is Σ c_i·CE_i / Σ c_i·n_i over supervised tokens. λ = 0 gives c_i = 1 exactly: plain
//! training, bit for bit. α multiplies every D alike, so it cancels in D_i / D̄: it sets the
//! scale of the reported D, not the weights.

use crate::data::batch::ExampleWeights;
use crate::data::Record;
use serde_json::Value;

pub const DEFAULT_ALPHA: f64 = 2.7;
/// α outside this range is refused (the published valid range).
pub const ALPHA_MIN: f64 = 2.3;
pub const ALPHA_MAX: f64 = 3.0;
pub const DEFAULT_LAMBDA: f64 = 0.6;
/// Keeps ln(1 − w) finite at w = 1 (which is refused anyway: w ≤ 0.99).
pub const LOG_EPS: f64 = 1e-8;
pub const MAX_AUTH_WEIGHT: f64 = 0.99;
/// Field names of the two inputs in a JSONL row.
pub const AUTH_WEIGHT: &str = "auth_weight";
pub const PROV_ENTROPY: &str = "prov_entropy";

/// An example's authority weight and provenance entropy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Provenance {
    pub auth_weight: f64,
    pub prov_entropy: f64,
}

/// D = α · (ln(1 − w + 1e-8) + H)².
pub fn distrust_d(alpha: f64, p: Provenance) -> f64 {
    let t = (1.0 - p.auth_weight + LOG_EPS).ln() + p.prov_entropy;
    alpha * t * t
}

/// Checks that `w` and `H` can enter the formula.
pub fn check(p: Provenance) -> Result<Provenance, String> {
    let (w, h) = (p.auth_weight, p.prov_entropy);
    if !w.is_finite() || !(0.0..=MAX_AUTH_WEIGHT).contains(&w) {
        return Err(format!(
            "`{AUTH_WEIGHT}` {w} is outside [0, {MAX_AUTH_WEIGHT}]"
        ));
    }
    if !h.is_finite() || h < 0.0 {
        return Err(format!("`{PROV_ENTROPY}` {h} must be a finite number ≥ 0"));
    }
    Ok(p)
}

/// The row's `auth_weight` and `prov_entropy`: `Ok(None)` when it has neither, an error (the
/// reason, without the location) when it has one without the other or a bad value.
pub fn read_provenance(rec: &Record) -> Result<Option<Provenance>, String> {
    let num = |key: &str| -> Result<Option<f64>, String> {
        match rec.fields.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("`{key}` is not a finite number")),
            Some(other) => Err(format!("`{key}` must be a number, found {other}")),
        }
    };
    match (num(AUTH_WEIGHT)?, num(PROV_ENTROPY)?) {
        (None, None) => Ok(None),
        (Some(w), Some(h)) => check(Provenance {
            auth_weight: w,
            prov_entropy: h,
        })
        .map(Some),
        (Some(_), None) => Err(format!(
            "has `{AUTH_WEIGHT}` but no `{PROV_ENTROPY}` (run `your_ai score` to compute both)"
        )),
        (None, Some(_)) => Err(format!(
            "has `{PROV_ENTROPY}` but no `{AUTH_WEIGHT}` (run `your_ai score` to compute both)"
        )),
    }
}

/// Whether any record carries distrust fields (turns `train --distrust` on by default).
pub fn any_scored(records: &[Record]) -> bool {
    records
        .iter()
        .any(|r| r.fields.contains_key(AUTH_WEIGHT) || r.fields.contains_key(PROV_ENTROPY))
}

/// c_i = (1 − λ) + λ · D_i / D̄. When D̄ is 0 (every example has ln(1 − w) + H = 0, so no
/// example is distrusted more than another) the ratio is taken as 1: every weight is 1.
pub fn example_weights(prov: &[Provenance], alpha: f64, lambda: f64) -> ExampleWeights {
    let d: Vec<f64> = prov.iter().map(|&p| distrust_d(alpha, p)).collect();
    let d_mean = d.iter().sum::<f64>() / d.len().max(1) as f64;
    let c = d
        .iter()
        .map(|&di| {
            let ratio = if d_mean > 0.0 { di / d_mean } else { 1.0 };
            ((1.0 - lambda) + lambda * ratio) as f32
        })
        .collect();
    ExampleWeights { d, c, d_mean }
}

/// Reads and checks the provenance of every training record; all bad rows are reported
/// together as `file:line: reason`.
pub fn training_provenance(records: &[Record]) -> Result<Vec<Provenance>, super::DistrustError> {
    let mut out = Vec::with_capacity(records.len());
    let mut errors = vec![];
    for r in records {
        match read_provenance(r) {
            Ok(Some(p)) => out.push(p),
            Ok(None) => errors.push(format!(
                "{}: no `{AUTH_WEIGHT}` / `{PROV_ENTROPY}` (distrust training needs both on every row: run `your_ai score` or `your_ai prepare`, or pass --no-distrust)",
                r.location
            )),
            Err(e) => errors.push(format!("{}: {e}", r.location)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(super::DistrustError::rows(errors))
    }
}

/// What `train --distrust / --no-distrust / --alpha / --lambda-weight` ask for, given the
/// training rows: `Ok(None)` for plain training, else the settings and every row's provenance.
/// Distrust is on when asked for, or when any row carries the fields and `--no-distrust` is not
/// given; then every row must carry valid ones.
pub fn resolve(
    on: bool,
    off: bool,
    alpha: f64,
    lambda: f64,
    records: &[Record],
) -> crate::error::Result<Option<(crate::train::config::DistrustSettings, Vec<Provenance>)>> {
    use crate::error::Error;
    if !(ALPHA_MIN..=ALPHA_MAX).contains(&alpha) {
        return Err(Error::Usage(format!(
            "--alpha {alpha}: it must be in [{ALPHA_MIN}, {ALPHA_MAX}] (the published range; default {DEFAULT_ALPHA})"
        )));
    }
    if !(0.0..=1.0).contains(&lambda) {
        return Err(Error::Usage(format!(
            "--lambda-weight {lambda}: it must be in [0, 1] (0 is plain training; default {DEFAULT_LAMBDA})"
        )));
    }
    let wanted = if off {
        false
    } else {
        on || any_scored(records)
    };
    if !wanted {
        return Ok(None);
    }
    let prov = training_provenance(records)?;
    Ok(Some((
        crate::train::config::DistrustSettings { alpha, lambda },
        prov,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(w: f64, h: f64) -> Provenance {
        Provenance {
            auth_weight: w,
            prov_entropy: h,
        }
    }

    #[test]
    fn d_follows_the_published_formula() {
        // w = 0.5, H = 1: ln(0.50000001) + 1 = 0.30685283...; squared × 2.7.
        let t = (0.5f64 + 1e-8).ln() + 1.0;
        assert!((distrust_d(2.7, p(0.5, 1.0)) - 2.7 * t * t).abs() < 1e-15);
        assert!((t - 0.306_852_84).abs() < 1e-8);
        // w = 0.99, H = 0: (ln 0.01)² · 2.7 = 4.60517² · 2.7 ≈ 57.2605.
        assert!((distrust_d(2.7, p(0.99, 0.0)) - 57.2605).abs() < 1e-3);
    }

    #[test]
    fn weights_average_to_one_and_lambda_zero_is_exactly_one() {
        let prov = [p(0.1, 3.0), p(0.9, 0.2), p(0.5, 1.0), p(0.0, 0.0)];
        let w = example_weights(&prov, 2.7, 0.6);
        let mean_c: f64 = w.c.iter().map(|&c| c as f64).sum::<f64>() / 4.0;
        assert!((mean_c - 1.0).abs() < 1e-6, "{mean_c}");
        assert!(w.c[0] > w.c[2], "higher D, higher weight");
        let plain = example_weights(&prov, 2.7, 0.0);
        assert!(plain.c.iter().all(|&c| c.to_bits() == 1f32.to_bits()));
        let full = example_weights(&prov, 2.7, 1.0);
        assert!((full.c[1] as f64 - full.d[1] / full.d_mean).abs() < 1e-6);
    }

    #[test]
    fn alpha_scales_every_d_alike_so_it_cancels_in_the_weights() {
        let prov = [p(0.1, 3.0), p(0.9, 0.2), p(0.5, 1.0)];
        let (a, b) = (
            example_weights(&prov, 2.3, 0.6),
            example_weights(&prov, 3.0, 0.6),
        );
        assert!((b.d_mean / a.d_mean - 3.0 / 2.3).abs() < 1e-12);
        for (x, y) in a.c.iter().zip(&b.c) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn zero_mean_d_gives_uniform_weights() {
        // ln(1 − w + 1e-8) + H = 0 exactly needs H = −ln(1 − w + 1e-8).
        let w = 0.5;
        let h = -(1.0 - w + LOG_EPS).ln();
        let e = example_weights(&[p(w, h), p(w, h)], 2.7, 0.6);
        assert_eq!(e.d_mean, 0.0);
        assert_eq!(e.c, vec![1.0, 1.0]);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (w, h, needle) in [
            (1.0, 0.0, "outside [0, 0.99]"),
            (-0.01, 0.0, "outside"),
            (f64::NAN, 0.0, "outside"),
            (0.5, -1e-9, "≥ 0"),
            (0.5, f64::INFINITY, "finite"),
        ] {
            let e = check(p(w, h)).unwrap_err();
            assert!(e.contains(needle), "{w} {h}: {e}");
        }
        assert!(check(p(0.99, 0.0)).is_ok());
        assert!(check(p(0.0, 12.0)).is_ok());
    }
}
