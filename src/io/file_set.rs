//! A set of files put into a directory that holds other things too (a run's output: the
//! adapter's files beside metrics and checkpoints), all of them or none. One directory can take
//! another's place in one rename; loose files cannot. So the complete, fsynced set is first
//! renamed to a hidden `.NAME.commit-PID` directory beside them, which commits it: its files are
//! then moved in one by one, and a crash part way leaves the rest there for [`finish_commits`]
//! to move in (at the run's next start, or when the adapter is next loaded). Moving in is
//! idempotent, so two processes finishing the same set agree.
//!
//! A leaf (plain `std::io` errors): the adapter loader uses it.

use std::path::{Path, PathBuf};

/// The hidden directory that a set of files named `name` is committed under.
pub fn commit_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}{COMMIT}{}", std::process::id()))
}

const COMMIT: &str = ".commit-";

/// Moves every file of the committed set `from` into `dir`, replacing what is there, then
/// removes `from`. A file already moved (by another process finishing the same set) is skipped.
pub fn move_in(from: &Path, dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(from) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        match std::fs::rename(entry.path(), dir.join(entry.file_name())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    // The renames made durable before the set's directory goes (best effort, as fsync of a
    // directory is not allowed everywhere).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    match std::fs::remove_dir(from) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves in the sets that a process killed while moving them in left in `dir`; returns how
/// many there were. Nothing in `dir` (or no `dir`) is not an error.
pub fn finish_commits(dir: &Path) -> std::io::Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut finished = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(COMMIT) && entry.path().is_dir() {
            move_in(&entry.path(), dir)?;
            finished += 1;
        }
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn a_set_cut_short_is_finished_whole_and_twice_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (f, text) in [("a.json", "old a"), ("b.bin", "old b"), ("metrics", "kept")] {
            std::fs::write(d.join(f), text).unwrap();
        }
        // Killed after moving in `a.json` of the new set: `b.bin` is still the old one.
        let set = commit_dir(d, "adapter");
        std::fs::create_dir(&set).unwrap();
        std::fs::write(set.join("b.bin"), "new b").unwrap();
        std::fs::write(d.join("a.json"), "new a").unwrap();
        assert_eq!(finish_commits(d).unwrap(), 1);
        assert_eq!(
            (read(&d.join("a.json")), read(&d.join("b.bin"))),
            ("new a".into(), "new b".into())
        );
        assert_eq!(read(&d.join("metrics")), "kept");
        assert!(!set.exists());
        assert_eq!(finish_commits(d).unwrap(), 0);
        // Finishing a set that another process finished meanwhile.
        move_in(&set, d).unwrap();
        assert_eq!(finish_commits(&d.join("missing")).unwrap(), 0);
    }
}
