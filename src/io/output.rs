//! A path the user names for an output, checked before any work: a fused model takes minutes
//! to write, and `--force` replaces what is there.

use crate::error::{Error, Result};
use std::path::Path;

/// Refuses `dest` (given with `flag`) when the output, a directory if `is_dir` and a file
/// otherwise, could not take its place (a file where a directory is there, or the reverse), or
/// when replacing it would destroy one of `inputs` (flag, path): `dest` is that input, holds
/// it, or is a file inside that input's directory (a model's weights, an adapter's files).
pub fn check_output(dest: &Path, flag: &str, is_dir: bool, inputs: &[(&str, &Path)]) -> Result<()> {
    if !is_dir
        && dest
            .as_os_str()
            .to_string_lossy()
            .ends_with(std::path::MAIN_SEPARATOR)
    {
        return Err(Error::Usage(format!(
            "{flag} {}: names a directory (it ends with {}), and this output is a file; give \
             its file name",
            dest.display(),
            std::path::MAIN_SEPARATOR
        )));
    }
    // A device, a FIFO or a socket is no output to replace (as root, `--force` would put a
    // file in the place of /dev/null).
    if std::fs::symlink_metadata(dest)
        .is_ok_and(|m| !(m.is_file() || m.is_dir() || m.file_type().is_symlink()))
    {
        return Err(Error::Usage(format!(
            "{flag} {}: is a device, a FIFO or a socket, not a file or directory an output can \
             replace; choose another path",
            dest.display()
        )));
    }
    let Ok(meta) = std::fs::metadata(dest) else {
        return Ok(());
    };
    if meta.is_dir() != is_dir {
        let (is, wants) = if meta.is_dir() {
            ("a directory", "a file")
        } else {
            ("a file", "a directory")
        };
        return Err(Error::Usage(format!(
            "{flag} {}: is {is}, and this output is {wants}; choose another path",
            dest.display()
        )));
    }
    let Ok(out) = std::fs::canonicalize(dest) else {
        return Ok(());
    };
    for (input_flag, input) in inputs {
        let Ok(i) = std::fs::canonicalize(input) else {
            continue;
        };
        if i.starts_with(&out) {
            let how = if i == out { "is" } else { "holds" };
            return Err(Error::Usage(format!(
                "{flag} {}: {how} {input_flag} {}, which replacing it would destroy; choose \
                 another {flag}",
                dest.display(),
                input.display()
            )));
        }
        // What exists in an input directory is its files (or a run's checkpoints), or may be.
        if i.is_dir() && out.starts_with(&i) {
            return Err(Error::Usage(format!(
                "{flag} {}: is inside {input_flag} {}, whose files replacing it could destroy; \
                 write the output outside that directory",
                dest.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_device_or_fifo_is_no_output() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()));
        for special in [fifo.as_path(), Path::new("/dev/null")] {
            let e = check_output(special, "--output", false, &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("is a device, a FIFO or a socket"), "{e}");
        }
    }

    #[test]
    fn an_output_that_is_or_holds_an_input_or_is_of_another_kind_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run");
        let adapter = dir.join("adapter");
        std::fs::create_dir_all(&adapter).unwrap();
        let model = root.path().join("model.gguf");
        std::fs::write(&model, "m").unwrap();
        let inputs = [
            ("--adapter", adapter.as_path()),
            ("--model", model.as_path()),
        ];
        let refused = |dest: &Path, is_dir: bool| {
            check_output(dest, "--output", is_dir, &inputs)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(refused(&adapter, true).contains("is --adapter"));
        assert!(refused(&dir, true).contains("holds --adapter"));
        assert!(refused(&model, false).contains("is --model"));
        assert!(refused(&dir.join("."), true).contains("holds --adapter"));
        assert!(refused(&dir, false).contains("is a directory, and this output is a file"));
        assert!(refused(&model, true).contains("is a file, and this output is a directory"));
        // An existing file in an input directory: its weights, say.
        let weights = adapter.join("adapter_model.safetensors");
        std::fs::write(&weights, "w").unwrap();
        assert!(refused(&weights, false).contains("is inside --adapter"));
        // Beside or inside the inputs, or not there yet: fine.
        assert_eq!(refused(&adapter.join("merged"), true), "");
        assert_eq!(refused(&adapter.join("merged.gguf"), false), "");
        assert_eq!(refused(&root.path().join("other.gguf"), false), "");
        let slash = Path::new("new/");
        assert!(refused(slash, false).contains("names a directory (it ends with /)"));
        assert_eq!(refused(slash, true), "");
        std::fs::create_dir_all(root.path().join("old")).unwrap();
        assert_eq!(refused(&root.path().join("old"), true), "");
    }
}
