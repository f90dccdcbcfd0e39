//! `your_ai score`: adds `auth_weight` and `prov_entropy` to every row of a JSONL file.

use crate::cli::ScoreArgs;
use crate::data::files::read_jsonl;
use crate::distrust::formula::{AUTH_WEIGHT, PROV_ENTROPY};
use crate::distrust::{scorer, DistrustError};
use crate::error::Result;
use crate::io::write_jsonl;
use serde_json::json;
use std::time::Instant;

pub fn run(a: ScoreArgs) -> Result<()> {
    if a.output.exists() && !a.force {
        return Err(crate::Error::Usage(format!(
            "--output {} already exists; pass --force to replace it",
            a.output.display()
        )));
    }
    let records = read_jsonl(&a.input)?;
    let start = Instant::now();
    let mut rows = Vec::with_capacity(records.len());
    let mut errors = vec![];
    let mut bytes = 0usize;
    let (mut sum_w, mut sum_h) = (0.0, 0.0);
    for r in records {
        match scorer::score_row(&r.fields) {
            Ok(s) => {
                bytes += scorer::row_text(&r.fields).map_or(0, |t| t.len());
                sum_w += s.auth_weight;
                sum_h += s.prov_entropy;
                let mut fields = r.fields;
                fields.insert(AUTH_WEIGHT.into(), json!(s.auth_weight));
                fields.insert(PROV_ENTROPY.into(), json!(s.prov_entropy));
                rows.push(fields);
            }
            Err(e) => errors.push(format!("{}: {e}", r.location)),
        }
    }
    if !errors.is_empty() {
        return Err(DistrustError::rows(errors).into());
    }
    let secs = start.elapsed().as_secs_f64();
    write_jsonl(&a.output, &rows, a.force, "--output")?;
    let n = rows.len().max(1) as f64;
    eprintln!(
        "scored {} rows ({:.1} MB of text in {:.2} s): mean {AUTH_WEIGHT} {:.3}, mean {PROV_ENTROPY} {:.3} bits → {}",
        rows.len(),
        bytes as f64 / 1e6,
        secs,
        sum_w / n,
        sum_h / n,
        a.output.display()
    );
    Ok(())
}
