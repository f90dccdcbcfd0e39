//! Where a run's data is (`train.jsonl`, and optionally `valid.jsonl` and `test.jsonl` in a
//! directory, or one file) and reading it line by line: every bad line is reported with its
//! `file:line`, an overlong line is never read whole.

use super::{parse_line, DataError, Record};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// Longest line accepted; longer ones are reported, never read whole into a model input.
const MAX_LINE_BYTES: usize = 64 << 20;

/// The files of a dataset.
#[derive(Debug, Clone)]
pub struct DataFiles {
    pub train: PathBuf,
    pub valid: Option<PathBuf>,
    pub test: Option<PathBuf>,
}

/// A directory with `train.jsonl` (and optionally `valid.jsonl`, `test.jsonl`), or one file.
pub fn resolve_files(path: &Path) -> Result<DataFiles, DataError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::Missing {
                path: path.to_path_buf(),
            })
        }
        // A symlink loop, a permission: said as it is, not as "does not exist".
        Err(e) => {
            return Err(DataError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    if meta.is_file() {
        return Ok(DataFiles {
            train: path.to_path_buf(),
            valid: None,
            test: None,
        });
    }
    if !meta.is_dir() {
        return Err(DataError::Read {
            path: path.to_path_buf(),
            reason: "not a regular file or a directory (a pipe or a device?); give a JSONL file \
                     or a directory holding train.jsonl"
                .into(),
        });
    }
    let train = data_file(path, "train.jsonl")?.ok_or_else(|| DataError::NoTrainFile {
        dir: path.to_path_buf(),
    })?;
    Ok(DataFiles {
        train,
        valid: data_file(path, "valid.jsonl")?,
        test: data_file(path, "test.jsonl")?,
    })
}

/// `dir/name` when it is a file (or a link to one), None when nothing is there; anything else
/// there (a dangling link, a directory, no permission) is an error, not a file passed over.
fn data_file(dir: &Path, name: &str) -> Result<Option<PathBuf>, DataError> {
    let p = dir.join(name);
    let bad = |reason: String| DataError::Read {
        path: p.clone(),
        reason,
    };
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(Some(p)),
        Ok(_) => Err(bad(format!(
            "not a regular file; {name} must be a JSONL file (or be left out)"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::read_link(&p) {
            Ok(target) => Err(bad(format!(
                "a symbolic link to {}, which does not exist; fix the link or remove it",
                target.display()
            ))),
            Err(_) => Ok(None),
        },
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Reads every line of a JSONL file; all bad lines are reported together.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>, DataError> {
    let records: Vec<Record> = read_lines(path, parse_line).map(|lines| {
        lines
            .into_iter()
            .map(|((example, fields), location)| Record {
                example,
                location,
                fields,
            })
            .collect()
    })?;
    note_mixed_formats(records.iter());
    Ok(records)
}

/// The fields of each format, in the order [`parse_line`] looks for them.
const FORMAT_FIELDS: [&[&str]; 3] = [&["messages"], &["prompt", "completion"], &["text"]];

/// Rows with the fields of more than one format (a dataset that keeps a `text` rendering
/// beside its `messages`) are read in the first format found: said, naming the rows, so a
/// file meant the other way is noticed. They are not refused: such datasets are common.
fn note_mixed_formats<'a>(records: impl Iterator<Item = &'a Record>) {
    let mut mixed = vec![];
    let mut used = "";
    for r in records {
        let formats: Vec<&[&str]> = FORMAT_FIELDS
            .into_iter()
            .filter(|keys| keys.iter().any(|k| r.fields.contains_key(*k)))
            .collect();
        if formats.len() > 1 {
            if mixed.is_empty() {
                used = formats[0][0];
            }
            mixed.push(r.location.clone());
        }
    }
    if !mixed.is_empty() {
        eprintln!(
            "note: {} row(s) have the fields of more than one format ({}); each is read in \
             the first of `messages`, `prompt`/`completion` and `text` it has (`{used}` for \
             the first named)",
            mixed.len(),
            crate::io::first_few(&mixed)
        );
    }
}

/// [`read_jsonl`], each record with its line as written: for a command that writes the rows
/// back with fields set ([`super::row_fields`]), every other value as it was.
pub fn read_jsonl_lines(path: &Path) -> Result<Vec<(Record, String)>, DataError> {
    let parse = |l: &str| parse_line(l).map(|parsed| (parsed, l.to_string()));
    let rows: Vec<(Record, String)> = read_lines(path, parse).map(|lines| {
        lines
            .into_iter()
            .map(|(((example, fields), line), location)| {
                let record = Record {
                    example,
                    location,
                    fields,
                };
                (record, line)
            })
            .collect()
    })?;
    note_mixed_formats(rows.iter().map(|(r, _)| r));
    Ok(rows)
}

/// Every non-blank line of a JSONL file through `parse`, each with its `file:line`; all bad
/// lines are reported together, and an empty file is refused.
pub fn read_lines<T>(
    path: &Path,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<(T, String)>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut reader = std::io::BufReader::new(file);
    let name = path.display().to_string();
    let mut records = vec![];
    let mut errors = vec![];
    let mut buf = vec![];
    let mut line_no = 0;
    loop {
        buf.clear();
        line_no += 1;
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if n == 0 {
            break;
        }
        let location = format!("{name}:{line_no}");
        if buf.len() > MAX_LINE_BYTES && !buf.ends_with(b"\n") {
            errors.push(format!(
                "{location}: line longer than {} MiB",
                MAX_LINE_BYTES >> 20
            ));
            // Skip the rest of the overlong line.
            loop {
                buf.clear();
                let m = (&mut reader)
                    .take(1 << 20)
                    .read_until(b'\n', &mut buf)
                    .map_err(|e| DataError::Read {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })?;
                if m == 0 || buf.ends_with(b"\n") {
                    break;
                }
            }
            continue;
        }
        let Ok(text) = std::str::from_utf8(&buf) else {
            errors.push(format!("{location}: not valid UTF-8"));
            continue;
        };
        // A byte-order mark (some editors write one) is not part of the first line's JSON.
        let text = if line_no == 1 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        if text.trim().is_empty() {
            continue;
        }
        match parse(text) {
            Ok(item) => records.push((item, location)),
            Err(reason) => errors.push(format!("{location}: {reason}")),
        }
    }
    if !errors.is_empty() {
        return Err(DataError::invalid(errors));
    }
    if records.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_reported_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"ok\"}\n\n{\"text\": \"ok\"}\nnot json\n\u{0}\n",
        )
        .unwrap();
        let e = read_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("train.jsonl:4: not valid JSON"), "{e}");
        assert!(e.contains("train.jsonl:5"), "{e}");
        assert!(e.starts_with("2 invalid"), "{e}");
        std::fs::write(&p, b"{\"text\": \"\xff\"}\n").unwrap();
        assert!(read_jsonl(&p)
            .unwrap_err()
            .to_string()
            .contains(":1: not valid UTF-8"));
        std::fs::write(&p, "\n\n").unwrap();
        assert!(matches!(read_jsonl(&p), Err(DataError::Empty { .. })));
    }

    #[test]
    fn a_data_file_that_is_there_but_unreadable_is_named_not_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("train.jsonl"), "{\"text\": \"ok\"}\n").unwrap();
        let files = resolve_files(d).unwrap();
        assert_eq!((files.valid, files.test), (None, None));
        std::os::unix::fs::symlink(d.join("gone.jsonl"), d.join("valid.jsonl")).unwrap();
        let e = resolve_files(d).unwrap_err().to_string();
        assert!(
            e.contains("valid.jsonl") && e.contains("gone.jsonl, which does not exist"),
            "{e}"
        );
        std::fs::remove_file(d.join("valid.jsonl")).unwrap();
        std::fs::create_dir(d.join("test.jsonl")).unwrap();
        let e = resolve_files(d).unwrap_err().to_string();
        assert!(
            e.contains("test.jsonl") && e.contains("not a regular file"),
            "{e}"
        );
        std::fs::remove_file(d.join("train.jsonl")).unwrap();
        std::os::unix::fs::symlink(d.join("gone.jsonl"), d.join("train.jsonl")).unwrap();
        let e = resolve_files(d).unwrap_err().to_string();
        assert!(
            e.contains("train.jsonl") && e.contains("does not exist"),
            "{e}"
        );
    }
}
