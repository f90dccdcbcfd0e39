//! `your_ai prepare`: from raw or scored JSONL files to a distrust training set
//! (`train.jsonl`, `valid.jsonl`), with the distribution of w and H printed.

use crate::cli::PrepareArgs;
use crate::data::files::read_jsonl_lines;
use crate::distrust::plot;
use crate::distrust::prepare::{self, Example, LOW_AUTHORITY_BELOW};
use crate::error::{Error, Result};
use crate::io::write_jsonl;

fn usage(msg: String) -> Error {
    Error::Usage(msg)
}

pub fn run(a: PrepareArgs) -> Result<()> {
    if !(a.low_authority_share > 0.0 && a.low_authority_share < 1.0) {
        return Err(usage(format!(
            "--low-authority-share {}: it must be above 0 and below 1 (default {})",
            a.low_authority_share,
            prepare::DEFAULT_LOW_AUTHORITY_SHARE
        )));
    }
    if !(0.0..1.0).contains(&a.valid_fraction) {
        return Err(usage(format!(
            "--valid-fraction {}: it must be at least 0 and below 1",
            a.valid_fraction
        )));
    }
    let train_path = a.output.join("train.jsonl");
    let valid_path = a.output.join("valid.jsonl");
    if a.output.exists() && !a.output.is_dir() {
        return Err(usage(format!(
            "--output {} is a file; name a directory",
            a.output.display()
        )));
    }
    for p in [&train_path, &valid_path] {
        if p.exists() && !a.force {
            return Err(usage(format!(
                "{} already exists; pass --force to replace it, or choose another --output",
                p.display()
            )));
        }
    }
    if let Some(plot) = &a.plot {
        if plot.exists() && !a.force {
            return Err(usage(format!(
                "--plot {} already exists; pass --force to replace it",
                plot.display()
            )));
        }
        let inputs: Vec<(&str, &std::path::Path)> =
            a.input.iter().map(|i| ("--input", i.as_path())).collect();
        crate::io::check_output(plot, "--plot", false, &inputs)?;
        if [&train_path, &valid_path]
            .iter()
            .any(|p| place(p) == place(plot))
        {
            return Err(usage(format!(
                "--plot {}: is one of the data files this writes; name a .png beside them",
                plot.display()
            )));
        }
    }
    let mut records = vec![];
    for input in &a.input {
        records.extend(read_jsonl_lines(input)?);
    }
    let read = records.len();
    let (examples, scored) = prepare::examples(records)?;
    let (examples, exact, near) = prepare::dedupe(examples);
    let before = examples.len();
    let (examples, note) = if a.no_rebalance {
        (examples, None)
    } else {
        prepare::rebalance(examples, a.low_authority_share, a.seed)
    };
    let rebalanced_away = before - examples.len();
    let low = examples.iter().filter(|e| e.is_low_authority()).count();
    let total = examples.len();
    let (train, valid) = prepare::split(examples, a.valid_fraction, a.seed);

    eprintln!(
        "read {read} rows from {} file(s); scored {scored} (the rest carried scores)",
        a.input.len()
    );
    eprintln!("dropped {exact} exact and {near} near-exact duplicate(s)");
    if let Some(n) = note {
        eprintln!("{n}");
    }
    eprintln!(
        "rebalanced: dropped {rebalanced_away}; low-authority (auth_weight < {LOW_AUTHORITY_BELOW}) {low} of {total} ({:.1}%, target {:.1}%)",
        100.0 * low as f64 / total.max(1) as f64,
        if a.no_rebalance { f64::NAN } else { 100.0 * a.low_authority_share }
    );
    let all: Vec<&Example> = train.iter().chain(&valid).collect();
    let ws: Vec<f64> = all.iter().map(|e| e.prov.auth_weight).collect();
    let hs: Vec<f64> = all.iter().map(|e| e.prov.prov_entropy).collect();
    let h_max = hs.iter().copied().fold(1.0f64, f64::max).ceil();
    let w_hist = prepare::histogram(&ws, 10, 0.0, 1.0);
    let h_hist = prepare::histogram(&hs, 10, 0.0, h_max);
    println!(
        "{}",
        prepare::render_histogram("auth_weight (w)", &w_hist, 0.0, 1.0)
    );
    println!(
        "{}",
        prepare::render_histogram("prov_entropy (H, bits)", &h_hist, 0.0, h_max)
    );

    std::fs::create_dir_all(&a.output).map_err(|e| Error::io("create", &a.output, e))?;
    let rows = |v: &[Example]| v.iter().map(|e| e.line.clone()).collect::<Vec<_>>();
    if !valid.is_empty() {
        write_jsonl(&valid_path, &rows(&valid), a.force, "--output")?;
    } else if a.force && valid_path.exists() {
        // A stale valid.jsonl from an earlier run would no longer match this train.jsonl.
        std::fs::remove_file(&valid_path).map_err(|e| Error::io("remove", &valid_path, e))?;
    }
    write_jsonl(&train_path, &rows(&train), a.force, "--output")?;
    if let Some(p) = &a.plot {
        let png = plot::histograms_png(&[(&w_hist, [200, 60, 40]), (&h_hist, [40, 90, 200])]);
        crate::io::write_file(p, &png)?;
        eprintln!(
            "plot: {} (left: auth_weight 0–1, right: prov_entropy 0–{h_max} bits; 10 bins each)",
            p.display()
        );
    }
    eprintln!(
        "wrote {} training and {} validation examples to {}",
        train.len(),
        valid.len(),
        a.output.display()
    );
    Ok(())
}

/// Where `p` is, for comparing two paths that may not exist yet: its folder resolved (links,
/// `..`) where it exists, and its name.
fn place(p: &std::path::Path) -> std::path::PathBuf {
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = parent.map_or_else(|| std::path::PathBuf::from("."), |d| d.to_path_buf());
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    dir.join(p.file_name().unwrap_or_default())
}
