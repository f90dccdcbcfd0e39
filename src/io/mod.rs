//! Files written whole or not at all, and error lists cut to their first few.
//!
//! Every output is written under a hidden temporary name beside its destination, fsynced, and
//! renamed into place; a crash at any point leaves the old content or the new, never a mix.
//! [`Staged`] is that for a file or directory being built; [`write_file`] and [`write_jsonl`]
//! for content that is ready at once.

pub mod error_list;
pub mod file_set;
pub mod output;
pub mod tensors;

pub use error_list::{first_errors, first_few, MAX_SHOWN_ERRORS};
pub use output::check_output;

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A destination being written: `tmp` while in progress, put in the place of `dest` by
/// [`Staged::commit`]. Dropped without a commit (an error on the way), the temporary output is
/// removed.
pub struct Staged {
    pub dest: PathBuf,
    pub tmp: PathBuf,
    committed: bool,
    /// The directories made for `dest`'s parent, deepest first: removed again (when left
    /// empty) if nothing is committed.
    created: Vec<PathBuf>,
}

impl Staged {
    /// For an output the user names with `flag` (a directory if `is_dir`, else a file):
    /// refuses, before any work, what [`check_output`] refuses (an output that would replace one
    /// of `inputs`, or one of the other kind), and an existing `dest` unless `force`.
    pub fn new(
        dest: &Path,
        force: bool,
        flag: &str,
        is_dir: bool,
        inputs: &[(&str, &Path)],
    ) -> Result<Self> {
        check_output(dest, flag, is_dir, inputs)?;
        if dest.exists() && !force {
            return Err(Error::Usage(format!(
                "{flag} {}: already exists; choose another path or pass --force to replace it",
                dest.display()
            )));
        }
        let staged = Self::replacing(dest).map_err(|e| match e {
            Error::Usage(m) => Error::Usage(format!("{flag} {m}")),
            e => e,
        })?;
        staged.clear_dead_partials();
        Ok(staged)
    }

    /// Temporary outputs for `dest` of runs that were killed (a signal skips `Drop`): a fused
    /// model's is as large as the model.
    fn clear_dead_partials(&self) {
        let (Some(name), Ok(rd)) = (
            file_name(&self.dest),
            std::fs::read_dir(parent_of(&self.dest)),
        ) else {
            return;
        };
        let prefix = format!(".{name}.partial-");
        for e in rd.flatten() {
            let entry = e.file_name().to_string_lossy().into_owned();
            let pid = entry.strip_prefix(&prefix).and_then(|p| p.parse().ok());
            if pid.is_some_and(|pid| !process_alive(pid)) {
                let _ = remove_any(&e.path());
            }
        }
    }

    /// For a file or directory of ours that is rewritten (a checkpoint's `latest`, `best/`,
    /// the metrics file): whatever is at `dest` is replaced on commit. Creates the parent.
    pub fn replacing(dest: &Path) -> Result<Self> {
        let name = file_name(dest).ok_or_else(|| {
            Error::Usage(format!("{}: not a file or directory name", dest.display()))
        })?;
        let parent = parent_of(dest);
        let created: Vec<PathBuf> = parent
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io("create", &parent, e))?;
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        remove_any(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
        Ok(Self {
            dest: dest.to_path_buf(),
            tmp,
            committed: false,
            created,
        })
    }

    /// Moves the finished output into place (fsynced first), replacing what is there.
    pub fn commit(mut self) -> Result<()> {
        sync_path(&self.tmp).map_err(|e| Error::io("sync", &self.tmp, e))?;
        if self.tmp.is_dir() {
            replace_dir(&self.tmp, &self.dest)?;
        } else {
            std::fs::rename(&self.tmp, &self.dest)
                .map_err(|e| Error::io("rename into place", &self.dest, e))?;
        }
        sync_dir(&parent_of(&self.dest));
        self.committed = true;
        Ok(())
    }

    /// Moves the files of the finished directory `tmp` into `dir`, beside what else is there,
    /// as one set (see [`file_set`]): a crash part way is finished later, never left mixed.
    pub fn commit_files_into(mut self, dir: &Path) -> Result<()> {
        sync_path(&self.tmp).map_err(|e| Error::io("sync", &self.tmp, e))?;
        let set = file_set::commit_dir(dir, &file_name(&self.dest).unwrap_or_default());
        remove_any(&set).map_err(|e| Error::io("remove", &set, e))?;
        std::fs::rename(&self.tmp, &set).map_err(|e| Error::io("rename", &set, e))?;
        self.committed = true;
        sync_dir(dir);
        file_set::move_in(&set, dir).map_err(|e| Error::io("move into place", dir, e))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_any(&self.tmp);
            for d in &self.created {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// Writes `text` to standard output at once (a reply streams piece by piece). A failure (a
/// full disk, a closed descriptor) is an error, not a lost reply with exit 0; a closed pipe
/// ends the process by SIGPIPE, as other command-line tools do.
pub fn print(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| crate::Error::io("write", "standard output", e))
}

/// A reply streamed to standard output piece by piece: the first write that fails stops it,
/// and is reported at its end.
#[derive(Default)]
pub struct StreamedReply {
    failed: Option<crate::Error>,
}

impl StreamedReply {
    /// Writes `piece`; `Break` once standard output does not take it.
    pub fn piece(&mut self, piece: &str) -> std::ops::ControlFlow<()> {
        match print(piece) {
            Ok(()) => std::ops::ControlFlow::Continue(()),
            Err(e) => {
                self.failed = Some(e);
                std::ops::ControlFlow::Break(())
            }
        }
    }

    /// The reply's closing newline, or the write that failed.
    pub fn end(self) -> Result<()> {
        match self.failed {
            Some(e) => Err(e),
            None => print("\n"),
        }
    }
}

/// Writes `bytes` to `path` whole: a temporary sibling, fsynced, renamed over `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let staged = Staged::replacing(path)?;
    write_synced(&staged.tmp, bytes)?;
    staged.commit()
}

/// Writes JSONL rows (each one JSON object's text) to `path` whole or not at all. An existing
/// file is refused unless `force` (`flag` names the option that chose the path, for the
/// message).
pub fn write_jsonl(path: &Path, rows: &[String], force: bool, flag: &str) -> Result<()> {
    let staged = Staged::new(path, force, flag, false, &[])?;
    let tmp = &staged.tmp;
    let f = std::fs::File::create(tmp).map_err(|e| Error::io("create", tmp, e))?;
    let mut w = std::io::BufWriter::new(f);
    for r in rows {
        w.write_all(r.as_bytes())
            .and_then(|_| w.write_all(b"\n"))
            .map_err(|e| Error::io("write", tmp, e))?;
    }
    w.into_inner()
        .map_err(|e| Error::io("write", tmp, e.into_error()))?;
    staged.commit()
}

/// Creates `path` with `bytes`, fsynced (inside a staged directory, say).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_all().map_err(|e| Error::io("sync", path, e))
}

/// Puts the complete directory `tmp` in the place of `dir`. Where `dir` exists (a checkpoint
/// rewritten after resuming from an earlier one, `best/`), the two are swapped in one step
/// (Linux `renameat2(RENAME_EXCHANGE)`) so that a crash never leaves `dir` missing; the old
/// content, now under the hidden name `tmp`, is then deleted. Where the filesystem cannot swap,
/// the old one is moved aside first and deleted after: a crash in between leaves `dir` absent
/// and the old content under a hidden name.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        if exchange(tmp, dir).is_ok() {
            let _ = remove_any(tmp);
            return Ok(());
        }
        let name = file_name(dir).unwrap_or_default();
        let old = dir.with_file_name(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| Error::io("move aside", dir, e))?;
        std::fs::rename(tmp, dir).map_err(|e| Error::io("rename into place", dir, e))?;
        let _ = remove_any(&old);
        return Ok(());
    }
    std::fs::rename(tmp, dir).map_err(|e| Error::io("rename into place", dir, e))
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both arguments are NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Removes a directory without ever leaving it half-deleted under its own name: it is first
/// renamed to a hidden name (atomic), then deleted; a crash in between leaves only the hidden
/// leftover, which [`clear_leftovers`] removes.
pub fn discard(dir: &Path) -> Result<()> {
    let name = file_name(dir).unwrap_or_default();
    let trash = dir.with_file_name(format!(".{name}.trash-{}", std::process::id()));
    std::fs::rename(dir, &trash).map_err(|e| Error::io("move aside", dir, e))?;
    std::fs::remove_dir_all(&trash).map_err(|e| Error::io("remove", &trash, e))
}

/// Whether `name` is a hidden leftover of an interrupted write (see [`clear_leftovers`]).
pub fn is_leftover(name: &str) -> bool {
    name.starts_with('.')
        && [".partial-", ".old-", ".trash-", ".tmp-"]
            .iter()
            .any(|k| name.contains(k))
}

/// Removes a file or a directory tree; nothing there is not an error.
pub fn remove(p: &Path) -> Result<()> {
    remove_any(p).map_err(|e| Error::io("remove", p, e))
}

/// Removes the hidden leftovers that a crash can leave in `dir` (temporary outputs, content
/// moved aside): every entry named `.<something>.<kind>-<pid>` for the kinds written here.
pub fn clear_leftovers(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_leftover(&name) {
            let _ = remove_any(&e.path());
        }
    }
}

/// fsync of a file, or of every file in a directory, so the rename publishes complete data.
pub fn sync_path(p: &Path) -> std::io::Result<()> {
    if p.is_dir() {
        for entry in std::fs::read_dir(p)? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::File::open(&path)?.sync_all()?;
            }
        }
        std::fs::File::open(p)?.sync_all()
    } else {
        std::fs::File::open(p)?.sync_all()
    }
}

/// fsync of a directory's entries (best effort: not every filesystem allows it).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The lock a run holds on its output directory for its whole life: an OS lock on a file that
/// names the process. A second run on the same directory is refused while the first lives; the
/// OS drops the lock of a process that dies, so a killed run's lock is taken over. (A process
/// id alone raced: a file created but not yet written read as a dead run's.)
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    /// Open for as long as the lock is held: closing it releases the OS lock.
    file: std::fs::File,
}

impl DirLock {
    /// The lock file's name inside the locked directory.
    pub const FILE: &'static str = ".your_ai.lock";

    /// Refuses a `dir` (given by `flag`) that exists and is no directory.
    pub fn refuse_a_file(dir: &Path, flag: &str) -> Result<()> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Usage(format!(
                "{flag} {}: is a file, not a directory; name a directory (it is created if \
                 missing)",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Locks `dir` (created if missing); `flag` names the option that chose it, for messages.
    pub fn acquire(dir: &Path, flag: &str) -> Result<Self> {
        Self::refuse_a_file(dir, flag)?;
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Usage(format!(
                "{flag} {}: the directory cannot be created: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join(Self::FILE);
        let me = std::process::id();
        let busy = |pid: Option<u32>| {
            let who = pid.map_or(String::new(), |p| format!(" (process {p})"));
            Error::Usage(format!(
                "{flag} {}: another your_ai run{who} is using this directory; wait for it to \
                 end, or choose another {flag}. If no such run is alive (a process number \
                 reused after a restart), remove {}",
                dir.display(),
                path.display()
            ))
        };
        for _ in 0..3 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io("create", &path, e))?;
            let mut text = String::new();
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let _ = std::io::Read::read_to_string(&mut file, &mut text);
                    return Err(busy(holder_of(&text)));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
            }
            // The file may have been removed (its run ending) between our open and lock: such
            // a lock guards nothing, so take the one at the path now.
            if !same_file_at(&file, &path) {
                continue;
            }
            let _ = std::io::Read::read_to_string(&mut file, &mut text);
            let holder = holder_of(&text);
            // A run that took the OS lock (its file says so) is gone once the lock is free,
            // whatever now has its process number.
            let os_locked = text.split_whitespace().nth(1) == Some(OS_LOCKED);
            match holder {
                // Named, alive, and not holding the OS lock: a run of a version that did not
                // take one.
                Some(pid) if pid != me && !os_locked && process_alive(pid) => {
                    return Err(busy(Some(pid)))
                }
                _ if !text.trim().is_empty() && holder != Some(me) => eprintln!(
                    "note: {flag} {}: taking over the lock of a run that is gone{}",
                    dir.display(),
                    holder.map_or(String::new(), |p| format!(" (process {p})"))
                ),
                _ => {}
            }
            file.set_len(0)
                .and_then(|()| std::io::Seek::rewind(&mut file))
                .and_then(|()| writeln!(file, "{me} {OS_LOCKED}"))
                .map_err(|e| Error::io("write", &path, e))?;
            return Ok(Self { path, file });
        }
        Err(Error::Usage(format!(
            "{flag} {}: could not lock the directory ({} keeps being replaced)",
            dir.display(),
            path.display()
        )))
    }
}

/// How a lock file says its run holds the OS lock, after the process id.
const OS_LOCKED: &str = "os-lock";

/// The process a lock file names.
fn holder_of(text: &str) -> Option<u32> {
    text.split_whitespace().next()?.parse().ok()
}

/// Whether the open `file` is the one at `path` (not one removed since, or replaced).
#[cfg(unix)]
fn same_file_at(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file_at(_: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Removed while still held (a run that opened it meanwhile sees it gone, and retries),
        // and only while it is still ours (not one made after a user removed it).
        if same_file_at(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether process `pid` exists (on Linux, signal 0 checks without sending anything).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = i32::try_from(pid) else {
            return false;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "..")
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(DirLock::FILE);
        let lock = DirLock::acquire(dir.path(), "--output").unwrap();
        let e = DirLock::acquire(dir.path(), "--output")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("run (process {})", std::process::id())),
            "{e}"
        );
        drop(lock);
        assert!(!file.exists());
        // Held, its process id not written yet: it was taken for a dead run's.
        let held = std::fs::File::create(&file).unwrap();
        held.try_lock().unwrap();
        let e = DirLock::acquire(dir.path(), "--output")
            .unwrap_err()
            .to_string();
        assert!(e.contains("another your_ai run is using"), "{e}");
        drop(held);
        // Named by a live process that holds no OS lock (a run of an earlier version; this
        // process's parent stands in for it): refused too.
        std::fs::write(&file, format!("{}\n", std::os::unix::process::parent_id())).unwrap();
        let e = DirLock::acquire(dir.path(), "--output")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("remove {}", file.display())), "{e}");
        // Held by a process that is gone: taken over, and released on drop.
        std::fs::write(&file, "999999999\n").unwrap();
        let again = DirLock::acquire(dir.path(), "--output").unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            format!("{} os-lock\n", std::process::id())
        );
        drop(again);
        assert!(!file.exists());
        // Left by a killed run that held the OS lock, its number now another live process's
        // (the parent stands in): taken over, not refused.
        let parent = std::os::unix::process::parent_id();
        std::fs::write(&file, format!("{parent} os-lock\n")).unwrap();
        drop(DirLock::acquire(dir.path(), "--output").unwrap());
    }

    #[test]
    fn a_staged_output_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.txt");
        write_file(&dest, b"one").unwrap();
        write_file(&dest, b"two").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        // Dropped before commit: nothing new, no leftovers.
        let s = Staged::replacing(&dest).unwrap();
        std::fs::write(&s.tmp, b"half").unwrap();
        drop(s);
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A user's path is refused without force.
        let e = Staged::new(&dest, false, "--output", false, &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("--force"), "{e}");
        // A directory replaces the old one whole.
        let d = dir.path().join("best");
        for content in ["a", "b"] {
            let s = Staged::replacing(&d).unwrap();
            std::fs::create_dir(&s.tmp).unwrap();
            std::fs::write(s.tmp.join("f"), content).unwrap();
            s.commit().unwrap();
        }
        assert_eq!(std::fs::read_to_string(d.join("f")).unwrap(), "b");
        std::fs::create_dir(dir.path().join(".x.partial-1")).unwrap();
        clear_leftovers(dir.path());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn replace_dir_swaps_an_existing_directory_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("best");
        let tmp = root.path().join(".best.partial-1");
        for (d, text) in [(&dir, "old"), (&tmp, "new")] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("a"), text).unwrap();
        }
        replace_dir(&tmp, &dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "new");
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["best"], "the old content is deleted");
        // Into an empty place: a plain rename.
        let tmp2 = root.path().join(".c.partial-1");
        std::fs::create_dir_all(&tmp2).unwrap();
        replace_dir(&tmp2, &root.path().join("c")).unwrap();
        assert!(root.path().join("c").is_dir() && !tmp2.exists());
    }
}
