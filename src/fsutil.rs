//! Atomic file and folder writes, and path joining that cannot escape a folder.
//!
//! Output is always written under a hidden temporary name next to its destination and renamed
//! into place only once complete. A failed run (error, panic) removes the temporary on drop; an
//! interrupted one (Ctrl-C, SIGTERM) removes it in the CLI's signal handler through
//! [`remove_live_temporaries`]. Only a run killed with SIGKILL cannot clean up: it leaves a
//! hidden `.<name>.tmp-<pid>-<rand>` sibling, never a half-written file or folder under the
//! final name.

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// Temporaries being written right now, for [`remove_live_temporaries`].
static LIVE_TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

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

/// Delete every temporary file and folder still being written, for an interrupt handler that
/// is about to exit (Ctrl-C or SIGTERM during a long quantization). Returns what was removed.
pub fn remove_live_temporaries() -> Vec<PathBuf> {
    let paths = std::mem::take(&mut *live_temporaries());
    for p in &paths {
        let _ = if p.is_dir() {
            fs::remove_dir_all(p)
        } else {
            fs::remove_file(p)
        };
    }
    paths
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
        fs::create_dir(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        track(&tmp_dir);
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

    /// Rename the temporary folder to the final name. With overwrite, the old folder is moved
    /// aside first and deleted only after the new one is in place, so some complete version
    /// exists under the final name (or aside) at every moment.
    pub fn commit(mut self) -> Result<PathBuf> {
        let final_dir = self.final_dir.clone();
        let mut moved_aside: Option<PathBuf> = None;
        if final_dir.exists() || final_dir.is_symlink() {
            if final_dir.is_dir() && is_empty_dir(&final_dir) {
                fs::remove_dir(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
            } else if !final_dir.is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "{}: exists and is not a folder; refusing to replace it with one",
                    final_dir.display()
                )));
            } else if self.overwrite {
                let aside = hidden_sibling(&final_dir, "old")?;
                fs::rename(&final_dir, &aside).map_err(|e| Error::io(&final_dir, e))?;
                moved_aside = Some(aside);
            } else {
                return Err(Error::InvalidArgument(format!(
                    "{}: already exists; refusing to overwrite it (ask for overwrite explicitly)",
                    final_dir.display()
                )));
            }
        }
        if let Err(e) = fs::rename(&self.tmp_dir, &final_dir) {
            // Put the old version back so a failed commit loses nothing.
            if let Some(aside) = &moved_aside {
                let _ = fs::rename(aside, &final_dir);
            }
            return Err(Error::io(&final_dir, e));
        }
        self.committed = true;
        untrack(&self.tmp_dir);
        sync_dir(parent_of(&final_dir));
        if let Some(aside) = moved_aside {
            let removed = if aside.is_dir() && !aside.is_symlink() {
                fs::remove_dir_all(&aside)
            } else {
                fs::remove_file(&aside)
            };
            removed.map_err(|e| Error::io(&aside, e))?;
        }
        Ok(final_dir)
    }
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
        let tmp_path = hidden_sibling(path, "tmp")?;
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(|e| Error::io(&tmp_path, e))?;
        track(&tmp_path);
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
        let file = writer
            .into_inner()
            .map_err(|e| Error::io(&self.tmp_path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp_path, e))?;
        drop(file);
        fs::rename(&self.tmp_path, &self.final_path).map_err(|e| Error::io(&self.final_path, e))?;
        untrack(&self.tmp_path);
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
