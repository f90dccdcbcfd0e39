//! `your_ai validate`: a prompt suite through the model (and its adapter, or both side by
//! side), pass rates per category as a table on stdout and, with `--output`, as JSON.

use crate::cli::ValidateArgs;
use crate::distrust::suite::{self, Case};
use crate::error::{Error, Result};
use crate::infer::generate::generate;
use crate::infer::prompt::{chat_ids, user_turn};
use crate::model::lora::Adapter;
use crate::model::LoadedModel;
use serde_json::json;
use std::time::Instant;

/// One model's replies and verdicts.
struct Run {
    name: &'static str,
    replies: Vec<String>,
    failures: Vec<Vec<String>>,
}

impl Run {
    fn passed(&self) -> Vec<bool> {
        self.failures.iter().map(Vec::is_empty).collect()
    }
}

fn replies(
    loaded: &LoadedModel,
    cases: &[Case],
    a: &ValidateArgs,
    name: &'static str,
) -> Result<Run> {
    let tok = &loaded.tokenizer;
    let sampling = a.sampling.sampling()?;
    let mut run = Run {
        name,
        replies: vec![],
        failures: vec![],
    };
    for (i, c) in cases.iter().enumerate() {
        let start = Instant::now();
        let ids = chat_ids(tok, &user_turn(c.system.as_deref(), &c.prompt))?;
        let reply = generate(&loaded.model, tok, &ids, &sampling, |_| {
            std::ops::ControlFlow::Continue(())
        })?
        .text;
        let failed = suite::check(c, &reply);
        eprintln!(
            "[{name} {}/{}] {} {} ({:.1} s){}",
            i + 1,
            cases.len(),
            if failed.is_empty() { "pass" } else { "FAIL" },
            c.location,
            start.elapsed().as_secs_f64(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(": {}", failed.join("; "))
            }
        );
        run.replies.push(reply);
        run.failures.push(failed);
    }
    Ok(run)
}

fn rate(p: usize, n: usize) -> String {
    format!("{p}/{n} {:>3.0}%", 100.0 * p as f64 / n.max(1) as f64)
}

/// The table: one row per category and an overall row, one column per model.
fn table(cases: &[Case], runs: &[Run]) -> String {
    let per: Vec<_> = runs
        .iter()
        .map(|r| suite::by_category(cases, &r.passed()))
        .collect();
    let mut s = format!("{:<20} {:>4}", "category", "n");
    for r in runs {
        s.push_str(&format!("  {:>12}", r.name));
    }
    s.push('\n');
    for (cat, &(_, n)) in &per[0] {
        s.push_str(&format!("{cat:<20} {n:>4}"));
        for p in &per {
            s.push_str(&format!("  {:>12}", rate(p[cat].0, n)));
        }
        s.push('\n');
    }
    s.push_str(&format!("{:<20} {:>4}", "overall", cases.len()));
    for r in runs {
        let p = r.passed().iter().filter(|&&x| x).count();
        s.push_str(&format!("  {:>12}", rate(p, cases.len())));
    }
    s.push('\n');
    s
}

fn report_json(
    cases: &[Case],
    runs: &[Run],
    a: &ValidateArgs,
    suite_name: &str,
) -> serde_json::Value {
    let models: Vec<_> = runs
        .iter()
        .map(|r| {
            let passed = r.passed();
            let cats: serde_json::Map<String, serde_json::Value> = suite::by_category(cases, &passed)
                .into_iter()
                .map(|(c, (p, n))| (c, json!({"passed": p, "total": n, "rate": p as f64 / n.max(1) as f64})))
                .collect();
            let p = passed.iter().filter(|&&x| x).count();
            json!({
                "name": r.name,
                "overall": {"passed": p, "total": cases.len(), "rate": p as f64 / cases.len().max(1) as f64},
                "categories": cats,
                "cases": cases.iter().zip(&r.replies).zip(&r.failures).map(|((c, reply), f)| json!({
                    "location": c.location, "category": c.category, "prompt": c.prompt,
                    "reply": reply, "passed": f.is_empty(), "failed_checks": f,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "model": a.run.model.model,
        "adapter": a.run.adapter,
        "suite": suite_name,
        "max_tokens": a.sampling.max_tokens,
        "temperature": a.sampling.temperature,
        "models": models,
    })
}

pub fn run(a: ValidateArgs) -> Result<()> {
    if a.compare && a.run.adapter.is_none() {
        return Err(Error::Usage(
            "--compare runs the base model and an adapter side by side: give --adapter DIR".into(),
        ));
    }
    a.sampling.sampling()?;
    if a.sampling.max_tokens == 0 {
        return Err(Error::Usage("--max-tokens must be at least 1".into()));
    }
    let (text, suite_name) = match &a.suite {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|e| Error::io("read", p, e))?,
            p.display().to_string(),
        ),
        None => (suite::BUILTIN_SUITE.to_string(), "built-in".to_string()),
    };
    let cases = suite::parse(&text, &suite_name)?;
    // Refused now, not after the whole suite has run.
    let output = match &a.output {
        Some(out) => {
            let suite: &[(&str, &std::path::Path)] = match &a.suite {
                Some(p) => &[("--suite", p.as_path())],
                None => &[],
            };
            Some(crate::io::Staged::new(
                out, a.force, "--output", false, suite,
            )?)
        }
        None => None,
    };
    let mut loaded = a.run.load_for_decoding(false)?;
    let adapter = match &a.run.adapter {
        Some(dir) => Some(Adapter::load_peft(
            dir,
            &loaded.model.cfg,
            &loaded.model.device,
        )?),
        None => None,
    };
    let mut runs = vec![];
    if a.compare || adapter.is_none() {
        runs.push(replies(&loaded, &cases, &a, "base")?);
    }
    if let Some(ad) = adapter {
        loaded.model.adapter = Some(ad);
        runs.push(replies(&loaded, &cases, &a, "adapter")?);
    }
    print!("{}", table(&cases, &runs));
    if let Some(staged) = output {
        let v = report_json(&cases, &runs, &a, &suite_name);
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        crate::io::write_synced(&staged.tmp, text.as_bytes())?;
        let dest = staged.dest.clone();
        staged.commit()?;
        eprintln!("results: {}", dest.display());
    }
    Ok(())
}
