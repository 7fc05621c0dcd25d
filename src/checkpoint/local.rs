//! The local side of a transfer: scanning a directory into a snapshot, reading it as one byte
//! stream cut into chunks (hashing every file on the way), and writing a stream back into files
//! in a staging directory (checking every file's hash) before moving them into place.
//! Blocking code: callers run it on blocking threads.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use super::format::{check_relative_path, FileEntry};
use super::CheckpointError;

/// Downloaded data arrives in network-sized pieces (hyper reads up to ~400 KiB at a time):
/// pieces at least this large are written as they are, smaller ones gathered to this size, so
/// few bytes are copied and few writes are small.
const WRITE_BUFFER: usize = 128 << 10;

/// Names at the top of a directory that are ours (a restore's staging area) and never part of
/// a snapshot.
pub const STAGING_PREFIX: &str = ".rpa-restore.";

/// One regular file found by [`scan`].
#[derive(Debug, Clone)]
pub struct LocalFile {
    /// Relative, `/`-separated.
    pub rel: String,
    /// Absolute path.
    pub abs: PathBuf,
    /// Size when scanned.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time when scanned (a change during the upload is detected).
    pub mtime: Option<SystemTime>,
}

/// What [`scan`] found.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Regular files in path order.
    pub files: Vec<LocalFile>,
    /// Directories (relative) in path order.
    pub dirs: Vec<String>,
    /// Sum of file sizes.
    pub total: u64,
}

/// Lists `root` recursively: regular files and directories, sorted by path. Symlinks and special
/// files are refused (a symlink could point anywhere; copy the target in instead).
pub fn scan(root: &Path) -> Result<Snapshot, CheckpointError> {
    let meta = fs::metadata(root).map_err(|e| CheckpointError::io("reading", root, e))?;
    if !meta.is_dir() {
        return Err(CheckpointError::Local {
            path: root.to_owned(),
            problem: "is not a directory; pass the directory to checkpoint".into(),
        });
    }
    let mut snap = Snapshot::default();
    let mut stack = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| CheckpointError::io("listing", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| CheckpointError::io("listing", &dir, e))?;
            let name = entry.file_name();
            let path = entry.path();
            let Some(name) = name.to_str() else {
                return Err(CheckpointError::Local {
                    path,
                    problem: "has a name that is not UTF-8; rename it".into(),
                });
            };
            if rel_dir.is_empty() && name.starts_with(STAGING_PREFIX) {
                continue;
            }
            let rel = if rel_dir.is_empty() {
                name.to_owned()
            } else {
                format!("{rel_dir}/{name}")
            };
            if let Err(p) = check_relative_path(&rel) {
                return Err(CheckpointError::Local {
                    path,
                    problem: format!("cannot be stored: its relative path {p}; rename it"),
                });
            }
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| CheckpointError::io("reading", &path, e))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                snap.dirs.push(rel.clone());
                stack.push((path, rel));
            } else if ft.is_file() {
                snap.total = snap.total.saturating_add(meta.len());
                snap.files.push(LocalFile {
                    rel,
                    abs: path,
                    size: meta.len(),
                    mode: meta.mode() & 0o7777,
                    mtime: meta.modified().ok(),
                });
            } else {
                let what = if ft.is_symlink() {
                    "a symlink"
                } else {
                    "not a regular file"
                };
                return Err(CheckpointError::Local {
                    path,
                    problem: format!(
                        "is {what}; a checkpoint holds only regular files and directories (copy \
                         the target in instead)"
                    ),
                });
            }
        }
    }
    snap.files.sort_by(|a, b| a.rel.cmp(&b.rel));
    snap.dirs.sort();
    Ok(snap)
}

/// Reads a snapshot's files as one stream, in order, hashing each file.
pub struct StreamReader {
    files: Vec<LocalFile>,
    /// Index of the file being read.
    index: usize,
    /// The open file and how much of it is left.
    open: Option<(File, u64)>,
    hasher: Sha256,
    done: Vec<FileEntry>,
    offset: u64,
}

impl StreamReader {
    /// A reader over `snap`'s files.
    pub fn new(snap: &Snapshot) -> StreamReader {
        StreamReader {
            files: snap.files.clone(),
            index: 0,
            open: None,
            hasher: Sha256::new(),
            done: Vec::with_capacity(snap.files.len()),
            offset: 0,
        }
    }

    /// The next `len` bytes of the stream (fewer only at its end).
    pub fn read_chunk(&mut self, len: u64) -> Result<Vec<u8>, CheckpointError> {
        let cap = usize::try_from(len).map_err(|_| {
            CheckpointError::InvalidSettings("part size does not fit in memory".into())
        })?;
        let mut buf = vec![0u8; cap];
        let mut filled = 0usize;
        while filled < cap {
            if !self.ensure_open()? {
                break;
            }
            let Some((file, left)) = self.open.as_mut() else {
                break;
            };
            let want = (cap - filled).min(usize::try_from(*left).unwrap_or(usize::MAX));
            let f = &self.files[self.index];
            let n = file
                .read(&mut buf[filled..filled + want])
                .map_err(|e| CheckpointError::io("reading", &f.abs, e))?;
            if n == 0 {
                return Err(changed(f, "it shrank"));
            }
            self.hasher.update(&buf[filled..filled + n]);
            filled += n;
            *left -= n as u64;
            if *left == 0 {
                self.finish_file()?;
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    /// Opens the next file with bytes left; records empty files on the way. False at the end.
    fn ensure_open(&mut self) -> Result<bool, CheckpointError> {
        while self.open.is_none() {
            let Some(f) = self.files.get(self.index) else {
                return Ok(false);
            };
            let file = File::open(&f.abs).map_err(|e| CheckpointError::io("opening", &f.abs, e))?;
            self.open = Some((file, f.size));
            if f.size == 0 {
                self.finish_file()?;
            }
        }
        Ok(true)
    }

    fn finish_file(&mut self) -> Result<(), CheckpointError> {
        let f = &self.files[self.index];
        let meta = fs::metadata(&f.abs).map_err(|e| CheckpointError::io("reading", &f.abs, e))?;
        if meta.len() != f.size || meta.modified().ok() != f.mtime {
            return Err(changed(f, "it was modified"));
        }
        let digest = std::mem::take(&mut self.hasher).finalize();
        self.done.push(FileEntry {
            path: f.rel.clone(),
            size: f.size,
            sha256: hex::encode(digest),
            offset: self.offset,
            mode: f.mode,
        });
        self.offset += f.size;
        self.open = None;
        self.index += 1;
        Ok(())
    }

    /// Every file's entry, once the whole stream was read.
    pub fn finish(mut self) -> Result<Vec<FileEntry>, CheckpointError> {
        // Trailing empty files have no bytes to read; anything else left is a bug.
        if self.ensure_open()? {
            let path = self.files[self.index].abs.clone();
            return Err(CheckpointError::Local {
                path,
                problem: "was not read to its end (internal error)".into(),
            });
        }
        Ok(self.done)
    }
}

fn changed(f: &LocalFile, what: &str) -> CheckpointError {
    CheckpointError::Local {
        path: f.abs.clone(),
        problem: format!(
            "changed while it was being checkpointed ({what}); stop writing to the directory \
             during a checkpoint, then checkpoint again"
        ),
    }
}

/// Writes a stream back into a manifest's files under a staging directory, checking each file's
/// hash as it completes.
pub struct StreamWriter {
    staging: PathBuf,
    files: Vec<FileEntry>,
    index: usize,
    open: Option<(BufWriter<File>, u64)>,
    hasher: Sha256,
}

impl StreamWriter {
    /// A writer creating `files` (checked manifest entries) under `staging` (created here).
    pub fn new(
        staging: &Path,
        dirs: &[String],
        files: &[FileEntry],
    ) -> Result<Self, CheckpointError> {
        fs::create_dir_all(staging).map_err(|e| CheckpointError::io("creating", staging, e))?;
        for d in dirs {
            let p = staging.join(d);
            fs::create_dir_all(&p).map_err(|e| CheckpointError::io("creating", &p, e))?;
        }
        Ok(StreamWriter {
            staging: staging.to_owned(),
            files: files.to_vec(),
            index: 0,
            open: None,
            hasher: Sha256::new(),
        })
    }

    fn ensure_open(&mut self) -> Result<bool, CheckpointError> {
        while self.open.is_none() {
            let Some(f) = self.files.get(self.index) else {
                return Ok(false);
            };
            let path = self.staging.join(&f.path);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| CheckpointError::io("creating", parent, e))?;
            }
            let file =
                File::create(&path).map_err(|e| CheckpointError::io("creating", &path, e))?;
            self.open = Some((BufWriter::with_capacity(WRITE_BUFFER, file), f.size));
            if f.size == 0 {
                self.finish_file()?;
            }
        }
        Ok(true)
    }

    fn finish_file(&mut self) -> Result<(), CheckpointError> {
        let f = &self.files[self.index];
        let path = self.staging.join(&f.path);
        // Written through the page cache, not fsync'd: the store stays the source of truth and a
        // restore interrupted by a crash is simply run again.
        if let Some((mut file, _)) = self.open.take() {
            file.flush()
                .map_err(|e| CheckpointError::io("writing", &path, e))?;
        }
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if actual != f.sha256 {
            return Err(CheckpointError::Local {
                path,
                problem: format!(
                    "restored content hashes to {actual}, the manifest says {}; the checkpoint \
                     is damaged",
                    f.sha256
                ),
            });
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(|e| CheckpointError::io("setting permissions of", &path, e))?;
        self.index += 1;
        Ok(())
    }

    /// Appends the next bytes of the stream.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), CheckpointError> {
        while !data.is_empty() {
            if !self.ensure_open()? {
                return Err(CheckpointError::Local {
                    path: self.staging.clone(),
                    problem: "the data object is longer than its files".into(),
                });
            }
            let Some((file, left)) = self.open.as_mut() else {
                continue;
            };
            let n = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            let path = &self.files[self.index].path;
            file.write_all(&data[..n])
                .map_err(|e| CheckpointError::io("writing", self.staging.join(path), e))?;
            self.hasher.update(&data[..n]);
            *left -= n as u64;
            data = &data[n..];
            if *left == 0 {
                self.finish_file()?;
            }
        }
        Ok(())
    }

    /// Completes the stream (trailing empty files) and checks every file was written.
    pub fn finish(mut self) -> Result<(), CheckpointError> {
        if self.ensure_open()? {
            let f = &self.files[self.index];
            return Err(CheckpointError::Local {
                path: self.staging.join(&f.path),
                problem: "the data object ended before this file did".into(),
            });
        }
        Ok(())
    }
}

/// Removes staging directories an interrupted restore left in `target` (one restore into a
/// directory at a time).
pub fn remove_stale_staging(target: &Path) -> Result<(), CheckpointError> {
    let Ok(entries) = fs::read_dir(target) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with(STAGING_PREFIX)) {
            let p = entry.path();
            fs::remove_dir_all(&p).map_err(|e| CheckpointError::io("removing", &p, e))?;
        }
    }
    Ok(())
}

/// Moves a verified staging directory's content into `target`: directories first, then every
/// file by rename (atomic per file; a file of the same path is replaced). Other files already in
/// `target` are left alone.
pub fn commit_staging(
    staging: &Path,
    target: &Path,
    dirs: &[String],
    files: &[FileEntry],
) -> Result<(), CheckpointError> {
    for rel in dirs.iter().chain(files.iter().map(|f| &f.path)) {
        refuse_symlinked_parents(target, rel)?;
    }
    for d in dirs {
        let p = target.join(d);
        if p.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            return Err(CheckpointError::Local {
                path: p,
                problem: "exists and is not a directory, but the checkpoint has a directory \
                          there; move it away"
                    .into(),
            });
        }
        fs::create_dir_all(&p).map_err(|e| CheckpointError::io("creating", &p, e))?;
    }
    for f in files {
        let from = staging.join(&f.path);
        let to = target.join(&f.path);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| CheckpointError::io("creating", parent, e))?;
        }
        if to.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            return Err(CheckpointError::Local {
                path: to,
                problem: "is a directory, but the checkpoint has a file there; move it away".into(),
            });
        }
        fs::rename(&from, &to).map_err(|e| CheckpointError::io("moving into place", &to, e))?;
    }
    Ok(())
}

/// A restore never writes through a symlink already in the target (`target/a -> /etc` must not
/// turn `a/passwd` into `/etc/passwd`).
fn refuse_symlinked_parents(target: &Path, rel: &str) -> Result<(), CheckpointError> {
    let mut at = target.to_owned();
    let mut parts = rel.split('/').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            break;
        }
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(CheckpointError::Local {
                    path: at,
                    problem: "is a symlink in the restore target; the checkpoint has a directory                               there and will not write through it: remove the symlink"
                        .into(),
                })
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("sub/deeper")).unwrap();
        fs::create_dir_all(d.path().join("empty")).unwrap();
        fs::write(d.path().join("a.bin"), vec![7u8; 10]).unwrap();
        fs::write(d.path().join("sub/b.txt"), b"hello").unwrap();
        fs::write(d.path().join("sub/deeper/zero"), b"").unwrap();
        fs::write(d.path().join("z"), b"xyz").unwrap();
        d
    }

    #[test]
    fn stream_round_trip_with_any_chunking() {
        let src = tree();
        let snap = scan(src.path()).unwrap();
        assert_eq!(snap.total, 18);
        assert_eq!(
            snap.files
                .iter()
                .map(|f| f.rel.as_str())
                .collect::<Vec<_>>(),
            ["a.bin", "sub/b.txt", "sub/deeper/zero", "z"]
        );
        assert_eq!(snap.dirs, ["empty", "sub", "sub/deeper"]);
        for chunk in [1, 3, 10, 18, 100] {
            let mut r = StreamReader::new(&snap);
            let mut chunks = Vec::new();
            loop {
                let c = r.read_chunk(chunk).unwrap();
                if c.is_empty() {
                    break;
                }
                chunks.push(c);
            }
            let entries = r.finish().unwrap();
            assert_eq!(entries.len(), 4);
            assert_eq!(entries[3].offset, 15);
            let out = tempfile::tempdir().unwrap();
            let staging = out.path().join(".rpa-restore.t");
            let mut w = StreamWriter::new(&staging, &snap.dirs, &entries).unwrap();
            for c in &chunks {
                w.write(c).unwrap();
            }
            w.finish().unwrap();
            commit_staging(&staging, out.path(), &snap.dirs, &entries).unwrap();
            assert_eq!(fs::read(out.path().join("sub/b.txt")).unwrap(), b"hello");
            assert!(out.path().join("empty").is_dir());
            assert_eq!(fs::read(out.path().join("sub/deeper/zero")).unwrap(), b"");
        }
    }

    #[test]
    fn wrong_bytes_are_refused() {
        let src = tree();
        let snap = scan(src.path()).unwrap();
        let mut r = StreamReader::new(&snap);
        let mut all = r.read_chunk(100).unwrap();
        let entries = r.finish().unwrap();
        all[11] ^= 1;
        let out = tempfile::tempdir().unwrap();
        let mut w = StreamWriter::new(&out.path().join("s"), &[], &entries).unwrap();
        let e = w.write(&all).unwrap_err().to_string();
        assert!(e.contains("b.txt") && e.contains("damaged"), "{e}");
    }

    #[test]
    fn symlinks_and_changes_are_refused() {
        let src = tree();
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("link")).unwrap();
        let e = scan(src.path()).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        fs::remove_file(src.path().join("link")).unwrap();
        let snap = scan(src.path()).unwrap();
        fs::write(src.path().join("a.bin"), vec![1u8; 4]).unwrap();
        let mut r = StreamReader::new(&snap);
        let e = r.read_chunk(100).unwrap_err().to_string();
        assert!(e.contains("changed while"), "{e}");
        let e = scan(&src.path().join("z")).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn a_restore_does_not_write_through_a_symlink_of_the_target() {
        let src = tree();
        let snap = scan(src.path()).unwrap();
        let mut r = StreamReader::new(&snap);
        let all = r.read_chunk(100).unwrap();
        let entries = r.finish().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), out.path().join("sub")).unwrap();
        let staging = out.path().join(".rpa-restore.x");
        let mut w = StreamWriter::new(&staging, &snap.dirs, &entries).unwrap();
        w.write(&all).unwrap();
        w.finish().unwrap();
        let e = commit_staging(&staging, out.path(), &snap.dirs, &entries)
            .unwrap_err()
            .to_string();
        assert!(e.contains("symlink"), "{e}");
        assert!(fs::read_dir(elsewhere.path()).unwrap().next().is_none());
    }
}
