//! `your_ai score`: adds `auth_weight` and `prov_entropy` to every row of a JSONL file.

use crate::cli::ScoreArgs;
use crate::data::files::read_jsonl_lines;
use crate::data::row_fields::with_fields;
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
    let records = read_jsonl_lines(&a.input)?;
    let start = Instant::now();
    let mut rows = Vec::with_capacity(records.len());
    let mut errors = vec![];
    let mut bytes = 0usize;
    let (mut sum_w, mut sum_h) = (0.0, 0.0);
    for (r, line) in records {
        let scored = scorer::score_row(&r.fields).and_then(|s| {
            let fields = [
                (AUTH_WEIGHT, json!(s.auth_weight)),
                (PROV_ENTROPY, json!(s.prov_entropy)),
            ];
            Ok((s, with_fields(&line, &fields)?))
        });
        match scored {
            Ok((s, row)) => {
                bytes += scorer::row_text(&r.fields).map_or(0, |t| t.len());
                sum_w += s.auth_weight;
                sum_h += s.prov_entropy;
                rows.push(row);
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
