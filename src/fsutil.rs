//! Atomic file and folder writes, and path joining that cannot escape a folder.
//!
//! Output is always written under a hidden temporary name next to its destination and renamed
//! into place only once complete. A failed run (error, panic) removes the temporary on drop; an
//! interrupted one (Ctrl-C, SIGTERM) removes it in the CLI's signal handler through
//! [`remove_live_temporaries`], which waits while a folder is being swapped into place. A run
//! killed with SIGKILL cannot clean up: it leaves a hidden `.<name>.tmp-<pid>-<rand>` (or, on a
//! filesystem without atomic exchange, `.<name>.old-<pid>-<rand>`) sibling, never a half-written
//! file or folder under the final name, and the next write of the same name removes (or, for a
//! previous version moved aside, restores) what a dead process left: see
//! [`clean_stale_temporaries`] and `docs/architecture.md` ("Interrupted runs").

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// Temporaries being written right now, for [`remove_live_temporaries`]. Also held across the
/// swap of a finished folder into place, so an interrupt never deletes half of either version.
static LIVE_TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Folders of resumable work an interrupt keeps (see [`keep_for_resume`]).
static RESUMABLE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live_temporaries() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves a list that is still valid.
    LIVE_TEMPORARIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn track(path: &Path) {
    live_temporaries().push(path.to_path_buf());
}

fn untrack(path: &Path) {
    live_temporaries().retain(|p| p != path);
}

fn remove_path(p: &Path) -> io::Result<()> {
    if p.is_dir() && !p.is_symlink() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
}

/// Delete every temporary file and folder still being written, for an interrupt handler that
/// is about to exit (Ctrl-C or SIGTERM during a long quantization). Returns what was removed.
/// The lock stays held, so no other thread can start swapping a folder into place before the
/// process exits.
pub fn remove_live_temporaries() -> Vec<PathBuf> {
    let mut live = live_temporaries();
    let paths = std::mem::take(&mut *live);
    for p in &paths {
        // The writing thread may still rename one finished file into a folder being deleted
        // (its next step waits for this lock): delete again until nothing is left.
        for _ in 0..50 {
            let _ = remove_path(p);
            if !p.exists() && !p.is_symlink() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    std::mem::forget(live);
    paths
}

/// Record `dir` as resumable work that an interrupt must keep (and name), not delete.
pub fn keep_for_resume(dir: &Path) {
    RESUMABLE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.to_path_buf());
}

/// Forget `dir` (finished, or deleted).
pub fn forget_resumable(dir: &Path) {
    RESUMABLE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| p != dir);
}

/// The resumable folders an interrupt leaves behind, for the handler's message.
pub fn resumable_folders() -> Vec<PathBuf> {
    RESUMABLE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Whether process `pid` is alive on this machine: it exists (signal 0 probes without
/// sending) and is not a zombie, a killed process its parent has not reaped yet.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) state ...`; comm may hold spaces and parentheses, the state follows the last `)`.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next());
        if matches!(state, Some('Z' | 'X')) {
            return false;
        }
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The pid in a hidden sibling name `.<name>.<tag>-<pid>-<8 hex>`, when `entry` is one for
/// `name` and `tag`.
fn sibling_pid(entry: &str, name: &str, tag: &str) -> Option<u32> {
    let rest = entry.strip_prefix(&format!(".{name}.{tag}-"))?;
    let (pid, rand) = rest.split_once('-')?;
    let ok = rand.len() == 8 && rand.bytes().all(|b| b.is_ascii_hexdigit());
    (ok && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Remove what a killed run writing `path` left next to it: `.<name>.tmp-<pid>-*` temporaries
/// of processes that no longer exist, and `.<name>.old-<pid>-*` previous versions moved aside
/// (put back under `path` when nothing took their place, deleted otherwise). Only names of
/// exactly that shape are touched. Returns what was removed or restored.
pub fn clean_stale_temporaries(path: &Path) -> Vec<PathBuf> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return vec![];
    };
    let Ok(entries) = fs::read_dir(parent_of(path)) else {
        return vec![];
    };
    let mut touched = vec![];
    let mut stale: Vec<(PathBuf, bool)> = entries
        .flatten()
        .filter_map(|e| {
            let entry = e.file_name().to_str()?.to_string();
            let (pid, old) = match sibling_pid(&entry, name, "tmp") {
                Some(pid) => (pid, false),
                None => (sibling_pid(&entry, name, "old")?, true),
            };
            (!process_alive(pid)).then(|| (e.path(), old))
        })
        .collect();
    // Previous versions first, so one can be restored before temporaries are weighed.
    stale.sort_by_key(|(_, old)| !old);
    for (p, old) in stale {
        let restored = old && !path.exists() && !path.is_symlink() && fs::rename(&p, path).is_ok();
        if restored || remove_path(&p).is_ok() {
            touched.push(p);
        }
    }
    touched
}

/// A sibling of `path` named `.<name>.<tag>-<pid>-<rand>` (hidden, same filesystem so rename works).
fn hidden_sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidArgument(format!("{}: not a file or folder name", path.display()))
    })?;
    let mut hidden = OsString::from(".");
    hidden.push(name);
    hidden.push(format!(
        ".{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    Ok(path.with_file_name(hidden))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Make a rename durable: on Linux the new directory entry is only on disk once the folder is synced.
fn sync_dir(dir: &Path) {
    // Best effort: some filesystems refuse fsync on folders, and the data itself is already synced.
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path)
        .map(|mut it| it.next().is_none())
        .unwrap_or(false)
}

/// `path` made absolute with symbolic links and `..` resolved as far as the path exists: the
/// deepest existing ancestor is canonicalized and the rest appended. With `keep_last`, a final
/// component that is a symbolic link is not followed (a Hugging Face snapshot's file links to a
/// blob elsewhere; the link itself is what a folder replacement would delete).
fn resolved(path: &Path, keep_last: bool) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let (head, tail) = match (keep_last, abs.parent(), abs.file_name()) {
        (true, Some(parent), Some(name)) => (parent.to_path_buf(), vec![name.to_os_string()]),
        _ => (abs.clone(), vec![]),
    };
    let mut rest = tail;
    let mut cur = head;
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
}

/// Refuse to write the folder `output` over the files a run reads: replacing `output` (with
/// overwrite, or after an error) must never delete an input. Refused when an input is `output`
/// itself or lies inside it, compared with symbolic links and `..` resolved (and, for a link,
/// both the link and what it points to).
pub fn refuse_output_over_inputs(output: &Path, inputs: &[PathBuf]) -> Result<()> {
    let out = resolved(output, false);
    for input in inputs {
        for form in [resolved(input, false), resolved(input, true)] {
            if form.starts_with(&out) {
                let what = if form == out { "is" } else { "holds" };
                return Err(Error::InvalidArgument(format!(
                    "{}: the output folder {what} the input `{}`; writing it would destroy the \
                     input. Choose an output outside the model's files",
                    output.display(),
                    input.display()
                )));
            }
        }
    }
    Ok(())
}

/// A folder written under a temporary name and renamed into place by [`AtomicDir::commit`].
///
/// Dropping it without committing deletes the temporary folder and everything in it.
#[derive(Debug)]
pub struct AtomicDir {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl AtomicDir {
    /// Start writing `final_dir`; refuses (now and at commit) if it exists and is not empty.
    pub fn new(final_dir: &Path) -> Result<Self> {
        Self::with_overwrite(final_dir, false)
    }

    /// Like [`AtomicDir::new`]; with `overwrite`, an existing `final_dir` is replaced at commit.
    pub fn with_overwrite(final_dir: &Path, overwrite: bool) -> Result<Self> {
        clean_stale_temporaries(final_dir);
        // Refuse early so a long job does not run only to fail at the very end.
        if final_dir.exists() && !final_dir.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{}: exists and is not a folder; refusing to replace it with one",
                final_dir.display()
            )));
        }
        if !overwrite && final_dir.exists() && !is_empty_dir(final_dir) {
            return Err(Error::InvalidArgument(format!(
                "{}: already exists; refusing to overwrite it (ask for overwrite explicitly)",
                final_dir.display()
            )));
        }
        let parent = parent_of(final_dir);
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let tmp_dir = hidden_sibling(final_dir, "tmp")?;
        // Tracked before it exists, so an interrupt at any moment after creation removes it.
        track(&tmp_dir);
        if let Err(e) = fs::create_dir(&tmp_dir) {
            untrack(&tmp_dir);
            return Err(Error::io(&tmp_dir, e));
        }
        Ok(AtomicDir {
            final_dir: final_dir.to_path_buf(),
            tmp_dir,
            overwrite,
            committed: false,
        })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp_dir
    }

    /// The folder this will become.
    pub fn final_path(&self) -> &Path {
        &self.final_dir
    }

    /// Put the temporary folder in place under the final name. With overwrite, an existing
    /// folder is exchanged with the new one in a single step (Linux `renameat2` with
    /// `RENAME_EXCHANGE`) and deleted afterwards, so the final name holds the complete old or
    /// the complete new output at every moment, whenever the process dies. Where the
    /// filesystem cannot exchange, the old folder is moved aside first; a kill between the two
    /// renames is repaired by the next write of the same name ([`clean_stale_temporaries`]).
    pub fn commit(mut self) -> Result<PathBuf> {
        let final_dir = self.final_dir.clone();
        // Held until the new folder is in place: an interrupt handler waits for it.
        let mut live = live_temporaries();
        let mut previous: Option<PathBuf> = None;
        if final_dir.exists() || final_dir.is_symlink() {
            if final_dir.is_dir() && !final_dir.is_symlink() && is_empty_dir(&final_dir) {
                fs::remove_dir(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
            } else if !final_dir.is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "{}: exists and is not a folder; refusing to replace it with one",
                    final_dir.display()
                )));
            } else if !self.overwrite {
                return Err(Error::InvalidArgument(format!(
                    "{}: already exists; refusing to overwrite it (ask for overwrite explicitly)",
                    final_dir.display()
                )));
            } else {
                previous = Some(swap_in(&self.tmp_dir, &final_dir)?);
            }
        }
        if previous.is_none() {
            fs::rename(&self.tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        self.committed = true;
        live.retain(|p| p != &self.tmp_dir);
        sync_dir(parent_of(&final_dir));
        // The previous version is deleted with the lock still held: an interrupt meanwhile
        // waits rather than exiting with half of it left beside the output.
        if let Some(old) = previous {
            remove_path(&old).map_err(|e| Error::io(&old, e))?;
        }
        drop(live);
        Ok(final_dir)
    }
}

/// Replace the folder `target` by the folder `new`; returns where the previous `target` now
/// is (to delete). Exchanged atomically where the filesystem can; otherwise moved aside to
/// `.<name>.old-<pid>-<rand>` first and put back if the second rename fails.
fn swap_in(new: &Path, target: &Path) -> Result<PathBuf> {
    if exchange(new, target).is_ok() {
        return Ok(new.to_path_buf());
    }
    let aside = hidden_sibling(target, "old")?;
    fs::rename(target, &aside).map_err(|e| Error::io(target, e))?;
    if let Err(e) = fs::rename(new, target) {
        let _ = fs::rename(&aside, target);
        return Err(Error::io(target, e));
    }
    Ok(aside)
}

/// Exchange two paths in one step (both must exist).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let b = CString::new(b.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: two valid NUL-terminated paths relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            untrack(&self.tmp_dir);
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

/// A file written under a temporary name in its destination folder and renamed into place by
/// [`AtomicFile::commit`] (after fsync). Dropping it without committing deletes the temporary.
#[derive(Debug)]
pub struct AtomicFile {
    final_path: PathBuf,
    tmp_path: PathBuf,
    file: Option<io::BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        clean_stale_temporaries(path);
        let tmp_path = hidden_sibling(path, "tmp")?;
        track(&tmp_path);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(|e| {
                untrack(&tmp_path);
                Error::io(&tmp_path, e)
            })?;
        Ok(AtomicFile {
            final_path: path.to_path_buf(),
            tmp_path,
            file: Some(io::BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The destination, for error messages.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Write bytes, naming the destination file in any error.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.final_path.clone();
        self.write_all(bytes).map_err(|e| Error::io(path, e))
    }

    /// Flush, fsync and rename into place (replacing any existing file).
    pub fn commit(mut self) -> Result<PathBuf> {
        let writer = self
            .file
            .take()
            .ok_or_else(|| Error::Other("AtomicFile committed twice".into()))?;
        let placed = writer
            .into_inner()
            .map_err(|e| Error::io(&self.final_path, e.into_error()))
            .and_then(|file| file.sync_all().map_err(|e| Error::io(&self.final_path, e)))
            .and_then(|()| {
                fs::rename(&self.tmp_path, &self.final_path)
                    .map_err(|e| Error::io(&self.final_path, e))
            });
        untrack(&self.tmp_path);
        if let Err(e) = placed {
            // A full disk or a file-size limit: nothing half-written stays behind.
            let _ = fs::remove_file(&self.tmp_path);
            return Err(e);
        }
        sync_dir(parent_of(&self.final_path));
        Ok(self.final_path.clone())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("file already committed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            untrack(&self.tmp_path);
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// Write a whole file atomically: temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_bytes(bytes)?;
    file.commit()?;
    Ok(())
}

/// Join `relative` (e.g. a shard name taken from an index JSON) onto `root`, refusing anything
/// that could reach outside `root`: absolute paths, `..`, and symlinks whose target lies outside.
///
/// One exception keeps the Hugging Face cache working: when `root` is a cache snapshot
/// (`…/models--org--name/snapshots/<rev>`), its files are symlinks into `…/models--org--name/blobs`,
/// and targets inside that `blobs` folder are allowed.
pub fn safe_join(root: &Path, relative: &str) -> Result<PathBuf> {
    let refuse = |why: &str| {
        Error::InvalidArgument(format!(
            "refusing path `{relative}` under {}: {why}",
            root.display()
        ))
    };
    if relative.is_empty() {
        return Err(refuse("empty path"));
    }
    // Windows-style separators or drive letters would be plain characters on Unix; refuse them
    // anyway so a checkpoint behaves the same on every system.
    if relative.contains('\\') || relative.contains('\0') || relative.contains(':') {
        return Err(refuse("contains `\\`, `:` or NUL"));
    }
    let rel = Path::new(relative);
    let mut clean = PathBuf::new();
    for comp in rel.components() {
        match comp {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("contains a `..` component")),
            Component::RootDir | Component::Prefix(_) => return Err(refuse("is an absolute path")),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(refuse("names the folder itself"));
    }
    let joined = root.join(&clean);

    // Symlink check: resolve the longest existing prefix and compare with the resolved root.
    let Ok(canon_root) = root.canonicalize() else {
        return Ok(joined); // root missing: nothing can be followed; the open will report it
    };
    let mut allowed = vec![canon_root.clone()];
    if canon_root
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "snapshots")
    {
        if let Some(repo) = canon_root.parent().and_then(|p| p.parent()) {
            if let Ok(blobs) = repo.join("blobs").canonicalize() {
                allowed.push(blobs);
            }
        }
    }
    let mut probe = joined.clone();
    let resolved = loop {
        if let Ok(c) = probe.canonicalize() {
            break Some(c);
        }
        if !probe.pop() {
            break None;
        }
    };
    if let Some(resolved) = resolved {
        if !allowed.iter().any(|a| resolved.starts_with(a)) {
            return Err(refuse(&format!(
                "{} resolves through a symlink to {}, outside the folder",
                joined.display(),
                resolved.display()
            )));
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_over_inputs_are_refused_through_links_and_dots() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = tmp.path().join("blobs");
        let snap = tmp.path().join("snapshots").join("abc");
        fs::create_dir_all(&blobs).unwrap();
        fs::create_dir_all(&snap).unwrap();
        fs::write(blobs.join("x"), b"w").unwrap();
        std::os::unix::fs::symlink(blobs.join("x"), snap.join("model.safetensors")).unwrap();
        let input = vec![snap.join("model.safetensors")];
        // The snapshot (holding the link), its parents, and the blob folder (holding the
        // target) are all refused, also when spelled with `..`.
        for out in [
            snap.clone(),
            tmp.path().join("snapshots"),
            tmp.path().to_path_buf(),
            blobs.clone(),
            snap.join("..").join("abc"),
        ] {
            let e = refuse_output_over_inputs(&out, &input)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("would destroy the input"),
                "{}: {e}",
                out.display()
            );
        }
        // Beside the input, inside a new folder, or inside the snapshot: allowed.
        for out in [
            tmp.path().join("out"),
            snap.join("quantized"),
            tmp.path().join("new/deep"),
        ] {
            refuse_output_over_inputs(&out, &input).unwrap();
        }
    }

    #[test]
    fn an_existing_file_is_never_replaced_by_a_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"keep").unwrap();
        for overwrite in [false, true] {
            assert!(AtomicDir::with_overwrite(&f, overwrite).is_err());
        }
        assert_eq!(fs::read(&f).unwrap(), b"keep");
        assert_eq!(entries(tmp.path()), vec!["f".to_string()]);
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_dir_drop_without_commit_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        {
            let d = AtomicDir::new(&target).unwrap();
            fs::write(d.path().join("a.txt"), b"x").unwrap();
            assert!(d.path().starts_with(root.path()));
            assert!(d
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".out.tmp-"));
        }
        assert!(
            entries(root.path()).is_empty(),
            "left behind: {:?}",
            entries(root.path())
        );
    }

    #[test]
    fn atomic_dir_commit_renames_into_place() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let d = AtomicDir::new(&target).unwrap();
        fs::write(d.path().join("a.txt"), b"hello").unwrap();
        assert!(
            !target.exists(),
            "final folder must not exist before commit"
        );
        d.commit().unwrap();
        assert_eq!(fs::read(target.join("a.txt")).unwrap(), b"hello");
        assert_eq!(entries(root.path()), vec!["out".to_string()]);
    }

    #[test]
    fn atomic_dir_refuses_existing_unless_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("old.txt"), b"old").unwrap();
        let err = AtomicDir::new(&target).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");

        let d = AtomicDir::with_overwrite(&target, true).unwrap();
        fs::write(d.path().join("new.txt"), b"new").unwrap();
        d.commit().unwrap();
        assert_eq!(entries(&target), vec!["new.txt".to_string()]);
        assert_eq!(
            entries(root.path()),
            vec!["out".to_string()],
            "old copy must be deleted"
        );
    }

    #[test]
    fn atomic_dir_commit_refuses_folder_created_meanwhile() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let d = AtomicDir::new(&target).unwrap();
        fs::create_dir(&target).unwrap();
        fs::write(target.join("theirs.txt"), b"x").unwrap();
        assert!(d.commit().is_err());
        assert_eq!(entries(&target), vec!["theirs.txt".to_string()]);
        assert_eq!(
            entries(root.path()),
            vec!["out".to_string()],
            "temp folder must be removed"
        );
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(entries(root.path()), vec!["f.json".to_string()]);
    }

    #[test]
    fn atomic_file_drop_without_commit_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("big.bin");
        {
            let mut f = AtomicFile::create(&p).unwrap();
            f.write_bytes(&[1, 2, 3]).unwrap();
        }
        assert!(entries(root.path()).is_empty());
    }

    #[test]
    fn safe_join_accepts_plain_names() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(
            safe_join(root.path(), "a.safetensors").unwrap(),
            root.path().join("a.safetensors")
        );
        assert_eq!(
            safe_join(root.path(), "./sub/b.bin").unwrap(),
            root.path().join("sub/b.bin")
        );
    }

    #[test]
    fn safe_join_refuses_escapes() {
        let root = tempfile::tempdir().unwrap();
        for bad in [
            "../x.safetensors",
            "a/../../x",
            "/etc/passwd",
            "",
            ".",
            "a\\..\\b",
            "C:x",
        ] {
            let err = safe_join(root.path(), bad).unwrap_err().to_string();
            assert!(err.contains("refusing path"), "{bad}: {err}");
            assert!(
                err.contains(&format!("`{bad}`")),
                "must name the path: {err}"
            );
        }
    }

    #[test]
    fn safe_join_refuses_symlink_escape() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"x").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("f.bin"))
            .unwrap();
        let err = safe_join(root.path(), "link/secret")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("link/secret") && err.contains("symlink"),
            "{err}"
        );
        assert!(safe_join(root.path(), "f.bin").is_err());
        // A missing file below an escaping symlink is refused too.
        assert!(safe_join(root.path(), "link/missing").is_err());
    }

    /// A pid no process has: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn overwrite_swaps_the_new_folder_in_and_leaves_nothing_beside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("old.bin"), b"old").unwrap();
        let dir = AtomicDir::with_overwrite(&target, true).unwrap();
        fs::write(dir.path().join("new.bin"), b"new").unwrap();
        // Until the commit the old output is untouched under its name.
        assert_eq!(entries(&target), ["old.bin"]);
        dir.commit().unwrap();
        assert_eq!(entries(&target), ["new.bin"]);
        assert_eq!(entries(tmp.path()), ["out"]);
        // The fallback for filesystems without an atomic exchange gives the same result.
        let new = tmp.path().join("new");
        fs::create_dir(&new).unwrap();
        fs::write(new.join("third.bin"), b"3").unwrap();
        let old = swap_in(&new, &target).unwrap();
        assert_eq!(entries(&target), ["third.bin"]);
        assert_eq!(entries(&old), ["new.bin"]);
    }

    #[test]
    fn what_a_killed_run_left_is_removed_or_restored_by_the_next_write() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        let dead = dead_pid();
        let me = std::process::id();
        // Killed between moving the old output aside and renaming the new one in: the old
        // output comes back under its name.
        let aside = tmp.path().join(format!(".out.old-{dead}-0000beef"));
        fs::create_dir(&aside).unwrap();
        fs::write(aside.join("old.bin"), b"old").unwrap();
        let stale = tmp.path().join(format!(".out.tmp-{dead}-1234abcd"));
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join("half.bin"), b"h").unwrap();
        let stale_file = tmp.path().join(format!(".out.tmp-{dead}-00000001"));
        fs::write(&stale_file, b"h").unwrap();
        // A live run's temporary and names not of this shape are left alone.
        let live = tmp.path().join(format!(".out.tmp-{me}-0000cafe"));
        fs::create_dir(&live).unwrap();
        for other in [
            format!(".out.tmp-{dead}-xyz"),
            format!(".other.tmp-{dead}-1234abcd"),
            ".out.tmp-".to_string(),
        ] {
            fs::write(tmp.path().join(other), b"keep").unwrap();
        }
        let touched = clean_stale_temporaries(&target);
        assert_eq!(touched.len(), 3, "{touched:?}");
        assert_eq!(entries(&target), ["old.bin"]);
        assert!(!stale.exists() && !stale_file.exists() && live.exists());
        assert_eq!(entries(tmp.path()).len(), 5, "{:?}", entries(tmp.path()));
        // With the output in place, a previous version aside is deleted, not restored.
        fs::create_dir(&aside).unwrap();
        clean_stale_temporaries(&target);
        assert!(!aside.exists());
        assert_eq!(entries(&target), ["old.bin"]);
    }

    #[test]
    fn pids_are_read_only_from_names_of_the_exact_shape() {
        assert_eq!(sibling_pid(".m.tmp-42-0123abcd", "m", "tmp"), Some(42));
        assert_eq!(sibling_pid(".m.old-42-0123abcd", "m", "old"), Some(42));
        assert_eq!(sibling_pid(".m.tmp-42-0123abcd", "m", "old"), None);
        assert_eq!(sibling_pid(".m.tmp-42-0123abc", "m", "tmp"), None);
        assert_eq!(sibling_pid(".m.tmp--0123abcd", "m", "tmp"), None);
        assert_eq!(sibling_pid(".m.tmp-4x-0123abcd", "m", "tmp"), None);
        assert_eq!(sibling_pid(".mm.tmp-42-0123abcd", "m", "tmp"), None);
        assert!(!process_alive(dead_pid()));
        assert!(process_alive(std::process::id()));
    }

    #[test]
    fn safe_join_allows_hf_cache_blob_symlinks() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--name");
        let snap = repo.join("snapshots/abc123");
        fs::create_dir_all(&snap).unwrap();
        fs::create_dir_all(repo.join("blobs")).unwrap();
        fs::write(repo.join("blobs/deadbeef"), b"x").unwrap();
        std::os::unix::fs::symlink(
            "../../blobs/deadbeef",
            snap.join("model-00001-of-00002.safetensors"),
        )
        .unwrap();
        assert!(safe_join(&snap, "model-00001-of-00002.safetensors").is_ok());
    }
}

/// Lower-case hex sha256 of `bytes` (provenance of calibration data).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
