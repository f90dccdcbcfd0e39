//! The data of a run: the train, valid and (with `--test`) test files read and every line
//! checked, as SFT records or preference pairs, then encoded with the model's tokenizer and
//! template, every failure reported with its file:line.

use super::usage;
use crate::cli::TrainArgs;
use crate::data::files::{read_jsonl, DataFiles};
use crate::data::preference::{read_preferences, PreferenceExample};
use crate::data::tokenizer::Tokenizer;
use crate::data::{DataError, Encoder, Record, Sample};
use crate::error::Result;
use crate::train::trainer::{Datasets, PreferenceSets};
use std::path::{Path, PathBuf};

/// Flags that preference tuning does not combine with.
pub(super) fn check_preference_flags(a: &TrainArgs) -> Result<()> {
    let method = a.objective.method.name();
    if a.schedule.pack {
        return Err(usage(format!(
            "--pack with --method {method}: each answer of a pair is scored on its own row; drop --pack"
        )));
    }
    if a.distrust.distrust {
        return Err(usage(format!(
            "--distrust with --method {method}: distrust weighting applies to SFT only"
        )));
    }
    if !a.data.mask_prompt {
        return Err(usage(format!(
            "--no-mask-prompt with --method {method}: a preference pair scores its answers only"
        )));
    }
    Ok(())
}

/// The preference rows of the files (train, valid, and test with `--test`), for a
/// preference method; None for SFT.
#[allow(clippy::type_complexity)]
pub(super) fn read_pairs(
    a: &TrainArgs,
    files: &DataFiles,
) -> Result<Option<[Vec<(PreferenceExample, String)>; 3]>> {
    if !a.objective.method.is_preference() {
        return Ok(None);
    }
    let (train, valid, test) = read_files(a, files, read_preferences)?;
    Ok(Some([train, valid, test]))
}

/// Encodes every pair with the model's tokenizer and template (answers scored only), all
/// failures reported with their file:line.
pub(super) fn encode_pairs(
    a: &TrainArgs,
    tokenizer: &Tokenizer,
    [train, valid, test]: [Vec<(PreferenceExample, String)>; 3],
) -> Result<Datasets> {
    let encoder = Encoder::new(tokenizer, true, a.batch.max_seq_length)?;
    let (mut cut_off, mut truncated) = (vec![], vec![]);
    let mut encode = |rows: &[(PreferenceExample, String)]| -> Result<Vec<_>> {
        let (pairs, cut) = encoder.encode_pairs(rows)?;
        // The pairs kept are the rows, in order, less those left out.
        let kept = rows.iter().map(|r| &r.1).filter(|l| !cut.contains(l));
        truncated.extend(
            kept.zip(&pairs)
                .filter(|(_, p)| p.chosen.truncated > 0 || p.rejected.truncated > 0)
                .map(|(l, _)| l.clone()),
        );
        cut_off.extend(cut);
        Ok(pairs)
    };
    let sets = PreferenceSets {
        train: encode(&train)?,
        valid: encode(&valid)?,
        test: encode(&test)?,
    };
    if !cut_off.is_empty() {
        eprintln!(
            "warning: {} pair(s) have an answer with no token left within --max-seq-length {}, \
             or answers cut to the same tokens ({}), and are left out; raise --max-seq-length \
             or shorten their prompts",
            cut_off.len(),
            a.batch.max_seq_length,
            crate::io::first_few(&cut_off),
        );
    }
    if sets.train.is_empty() {
        return Err(usage(format!(
            "--max-seq-length {}: no training pair has both answers within it (the prompts \
             fill it); raise --max-seq-length or shorten the prompts",
            a.batch.max_seq_length
        )));
    }
    if !truncated.is_empty() {
        eprintln!(
            "warning: {} pair(s) longer than --max-seq-length {} were truncated ({})",
            truncated.len(),
            a.batch.max_seq_length,
            crate::io::first_few(&truncated),
        );
    }
    Ok(Datasets {
        train: vec![],
        valid: vec![],
        test: vec![],
        weights: None,
        pairs: Some(sets),
    })
}

/// The training, validation and (with `--test`) test records.
pub(super) fn read_records(
    a: &TrainArgs,
    files: &DataFiles,
) -> Result<(Vec<Record>, Vec<Record>, Vec<Record>)> {
    read_files(a, files, read_jsonl)
}

/// The training, validation and (with `--test`) test files through `read`; a missing
/// test.jsonl under `--test` is refused, and so is a `--save-best` asked for by name with no
/// validation data (on by default, it has nothing to pick from and would silently keep nothing).
#[allow(clippy::type_complexity)]
fn read_files<T>(
    a: &TrainArgs,
    files: &DataFiles,
    read: impl Fn(&Path) -> std::result::Result<Vec<T>, DataError>,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let optional = |p: Option<&PathBuf>| -> Result<Vec<T>> {
        Ok(match p {
            Some(p) => read(p)?,
            None => vec![],
        })
    };
    let train = read(&files.train)?;
    let valid = optional(files.valid.as_ref())?;
    if valid.is_empty() && a.output.save_best && a.given.contains("save_best") {
        let place = match &files.valid {
            Some(p) => format!("{} has no examples", p.display()),
            None => format!("{} has no valid.jsonl", a.data.data.display()),
        };
        return Err(usage(format!(
            "--save-best keeps the adapter with the best validation loss, and {place}: add \
             validation examples, or leave --save-best out"
        )));
    }
    if a.output.test && files.test.is_none() {
        return Err(usage(format!(
            "--test: {} has no test.jsonl",
            a.data.data.display()
        )));
    }
    let test = if a.output.test {
        optional(files.test.as_ref())?
    } else {
        vec![]
    };
    Ok((train, valid, test))
}

/// Encodes every record with the model's tokenizer and template, collecting all failures with
/// their file:line; refuses training data with no trained token.
pub(super) fn encode(
    a: &TrainArgs,
    tokenizer: &Tokenizer,
    (train, valid, test): (Vec<Record>, Vec<Record>, Vec<Record>),
    provenance: Option<&Vec<crate::distrust::formula::Provenance>>,
    files: &DataFiles,
) -> Result<Datasets> {
    let encoder = Encoder::new(tokenizer, a.data.mask_prompt, a.batch.max_seq_length)?;
    // Examples whose every trained token truncation cut off: they train nothing and are left
    // out, rather than fill a batch slot (or a whole step) with nothing to learn.
    let mut cut_off: Vec<String> = vec![];
    // Examples with assistant turns the template does not let us locate: those go untrained.
    let mut untrained: Vec<(String, usize)> = vec![];
    let mut truncated: Vec<String> = vec![];
    let mut encode_all = |records: &[Record]| -> Result<(Vec<Sample>, Vec<bool>)> {
        let (mut out, mut kept) = (Vec::with_capacity(records.len()), vec![]);
        let mut errors = vec![];
        for r in records {
            match encoder.encode(r) {
                Ok(s) => {
                    if s.truncated > 0 {
                        truncated.push(r.location.clone());
                    }
                    let keep = s.trained_count() > 0;
                    if !keep {
                        cut_off.push(r.location.clone());
                    }
                    if s.untrained_turns > 0 {
                        untrained.push((r.location.clone(), s.untrained_turns));
                    }
                    kept.push(keep);
                    if keep {
                        out.push(s)
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            return Err(DataError::invalid(errors).into());
        }
        Ok((out, kept))
    };
    let (train, kept) = encode_all(&train)?;
    let had_valid = !valid.is_empty();
    let (valid, test) = (encode_all(&valid)?.0, encode_all(&test)?.0);
    if train.is_empty() {
        return Err(usage(format!(
            "{}: no token of the training data is trained (every example is prompt only after \
             masking{}); check the data, or pass --no-mask-prompt to train on every token",
            files.train.display(),
            if truncated.is_empty() {
                ""
            } else {
                " or truncation"
            }
        )));
    }
    if !cut_off.is_empty() {
        eprintln!(
            "warning: {} example(s) have no trained token left within --max-seq-length {} ({}) \
             and are left out; raise --max-seq-length or shorten their prompts",
            cut_off.len(),
            a.batch.max_seq_length,
            crate::io::first_few(&cut_off),
        );
    }
    if !untrained.is_empty() {
        let turns: usize = untrained.iter().map(|u| u.1).sum();
        let shown: Vec<&str> = untrained.iter().map(|u| u.0.as_str()).collect();
        eprintln!(
            "warning: {turns} assistant turn(s) in {} example(s) are not trained: the chat \
             template renders them differently once later turns follow (it drops their \
             reasoning, say), so their tokens cannot be located ({}); the other turns are \
             trained. To train every turn, split such conversations, one example per turn",
            untrained.len(),
            crate::io::first_few(&shown),
        );
    }
    if !truncated.is_empty() {
        eprintln!(
            "warning: {} example(s) longer than --max-seq-length {} were truncated ({})",
            truncated.len(),
            a.batch.max_seq_length,
            crate::io::first_few(&truncated),
        );
    }
    if had_valid && valid.is_empty() {
        eprintln!(
            "warning: no validation example has a trained token left within --max-seq-length \
             {}: there will be no validation loss and no best/ adapter",
            a.batch.max_seq_length,
        );
    }
    // The distrust weights of the examples kept (D̄ is their mean).
    let provenance = provenance.map(|prov| -> Vec<_> {
        prov.iter()
            .zip(&kept)
            .filter(|(_, &k)| k)
            .map(|(p, _)| *p)
            .collect()
    });
    let weights = provenance.map(|prov| {
        crate::distrust::formula::example_weights(&prov, a.distrust.alpha, a.distrust.lambda_weight)
    });
    Ok(Datasets {
        train,
        valid,
        test,
        weights,
        pairs: None,
    })
}
