//! Verified, resumable file transfers between this machine and a pod over SFTP (`russh-sftp`,
//! used by this module only) on a pooled SSH channel.
//!
//! A file moves in chunks (default 8 MiB). The destination is written as `<dst>.rpa-part`;
//! every chunk's SHA-256 is checked **on the receiving side** (the pod hashes what it wrote for
//! an upload; this machine hashes what it read for a download, against hashes the pod computed
//! from its own copy) and recorded in `<dst>.rpa-journal` once it matches. A transfer that is
//! interrupted (process killed, connection cut) and started again skips every chunk the
//! journal holds with the hash the source still has, and sends only the rest. At the end the
//! whole file's SHA-256 is compared the same way and the part file renamed into place. Before
//! anything is sent, free space at the destination is checked against what is still to write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::OpenFlags;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tracing::Instrument;

use super::{AccessError, PodAccess};
use crate::checkpoint::progress::Progress;
use crate::join::pod::shell_quote;
use crate::join::{Output, SshTarget};

/// Default chunk size: 8 MiB.
pub const DEFAULT_CHUNK: u64 = 8 << 20;
/// Suffix of the file being written.
pub const PART_SUFFIX: &str = ".rpa-part";
/// Suffix of the journal of verified chunks.
pub const JOURNAL_SUFFIX: &str = ".rpa-journal";

/// How transfers run.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    /// Bytes per verified chunk.
    pub chunk_size: u64,
    /// Attempts after a dropped connection or a failed check (each resumes from the journal).
    pub retries: u32,
    /// A progress bar on a terminal.
    pub progress: bool,
}

impl Default for TransferSettings {
    fn default() -> Self {
        TransferSettings {
            chunk_size: DEFAULT_CHUNK,
            retries: 3,
            progress: false,
        }
    }
}

/// Which way the bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This machine → pod.
    Upload,
    /// Pod → this machine.
    Download,
}

/// One file moved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileReport {
    /// Path on this machine.
    pub local: String,
    /// Path on the pod.
    pub remote: String,
    /// Size.
    pub bytes: u64,
    /// SHA-256 of the whole file (hex), checked on both sides.
    pub sha256: String,
    /// Chunks in the file.
    pub chunks: u64,
    /// Chunks sent by this run.
    pub sent_chunks: u64,
    /// Chunks verified by an earlier, interrupted run and not sent again.
    pub resumed_chunks: u64,
}

/// What a transfer did (`cp --output json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferReport {
    /// Upload or download.
    pub direction: Direction,
    /// The pod.
    pub pod: String,
    /// Every file.
    pub files: Vec<FileReport>,
    /// Total size.
    pub bytes: u64,
    /// Bytes sent by this run.
    pub sent_bytes: u64,
    /// Chunks sent by this run.
    pub sent_chunks: u64,
    /// Chunks skipped as verified before.
    pub resumed_chunks: u64,
    /// Wall time.
    pub seconds: f64,
    /// Total size over wall time, in MB/s (10^6 bytes).
    pub mb_per_s: f64,
}

impl TransferReport {
    fn new(
        direction: Direction,
        pod: &str,
        files: Vec<FileReport>,
        sent_bytes: u64,
        t: Instant,
    ) -> Self {
        let bytes = files.iter().map(|f| f.bytes).sum();
        let seconds = t.elapsed().as_secs_f64();
        TransferReport {
            direction,
            pod: pod.to_owned(),
            sent_chunks: files.iter().map(|f| f.sent_chunks).sum(),
            resumed_chunks: files.iter().map(|f| f.resumed_chunks).sum(),
            files,
            bytes,
            sent_bytes,
            seconds,
            mb_per_s: if seconds > 0.0 {
                bytes as f64 / seconds / 1e6
            } else {
                0.0
            },
        }
    }
}

/// One entry of a pod directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemoteEntry {
    /// File name.
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, seconds since the epoch, when known.
    pub modified: Option<u64>,
}

// ---- pure helpers ------------------------------------------------------------------------

/// Number of chunks of a `size`-byte file.
pub fn chunk_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk.max(1))
}

/// Offset and length of chunk `i`.
fn chunk_span(i: u64, size: u64, chunk: u64) -> (u64, usize) {
    let off = i * chunk;
    (off, (size - off).min(chunk) as usize)
}

/// The first line of a journal: the file size and chunk size the entries are for.
fn journal_header(size: u64, chunk: u64) -> String {
    format!("rpa-transfer v1 size={size} chunk={chunk}\n")
}

/// Verified chunks (`index → sha256`) in a journal, when it is for this size and chunk size;
/// empty otherwise. A line cut short by an interruption is ignored.
pub fn parse_journal(text: &str, size: u64, chunk: u64) -> BTreeMap<u64, String> {
    let mut lines = text.lines();
    if lines.next().map(|l| format!("{l}\n")) != Some(journal_header(size, chunk)) {
        return BTreeMap::new();
    }
    let n = chunk_count(size, chunk);
    lines
        .filter_map(|l| {
            let (i, h) = l.split_once(' ')?;
            let i: u64 = i.parse().ok()?;
            (i < n && is_sha256_hex(h)).then(|| (i, h.to_owned()))
        })
        .collect()
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Pod shell function `h`: the hex SHA-256 of stdin, with OpenSSL when the pod has it (it uses
/// the CPU's SHA extensions: about 4× coreutils' `sha256sum`), else with `sha256sum`.
const SHA_FN: &str = "h() { if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r; else sha256sum; fi | cut -c1-64; }";

/// `dd` reading chunk `i` of `path` into `h` (GNU dd; every RunPod image has coreutils).
fn dd_chunk(path: &str, chunk: u64, i: &str) -> String {
    format!("dd if={path} bs={chunk} skip={i} count=1 iflag=fullblock 2>/dev/null | h")
}

/// Pod command after chunk `i` of an upload was written: hashes it, records it in the journal
/// when it is `expected`, and prints the hash.
fn verify_chunk_command(part: &str, journal: &str, chunk: u64, i: u64, expected: &str) -> String {
    format!(
        "{SHA_FN}; s=$({dd}) && [ \"$s\" = {exp} ] && echo \"{i} $s\" >> {journal}; echo \"$s\"",
        dd = dd_chunk(&shell_quote(part), chunk, &i.to_string()),
        exp = shell_quote(expected),
        journal = shell_quote(journal),
    )
}

/// Pod command ending an upload: the whole part file must hash to `expected` (else it prints
/// the hash, forgets the journal and exits 3); then it replaces `dst`.
fn finish_upload_command(part: &str, journal: &str, dst: &str, expected: &str) -> String {
    let (part, journal) = (shell_quote(part), shell_quote(journal));
    format!(
        "{SHA_FN}; s=$(h < {part}) || exit 1; if [ \"$s\" != {exp} ]; then rm -f {journal}; echo \"$s\"; exit 3; fi; mv -f {part} {dst} && rm -f {journal}",
        exp = shell_quote(expected),
        dst = shell_quote(dst),
    )
}

/// Pod command printing the SHA-256 of each of the `n` chunks of `path`, one a line, then of
/// the whole file.
fn hashes_command(path: &str, chunk: u64, n: u64) -> String {
    format!(
        "{SHA_FN}; f={f}; [ -r \"$f\" ] || {{ echo \"cannot read $f\" >&2; exit 2; }}; i=0; while [ $i -lt {n} ]; do {dd}; i=$((i+1)); done; h < \"$f\"",
        f = shell_quote(path),
        dd = dd_chunk("\"$f\"", chunk, "$i"),
    )
}

/// Free bytes from `df -Pk` output (the "Available" column, in KiB).
pub fn parse_df(stdout: &str) -> Option<u64> {
    let line = stdout.lines().nth(1)?;
    let avail: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(avail.saturating_mul(1024))
}

/// A size such as `8MiB`, `512K`, `1G` or `4096` (bytes). Suffixes are binary.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 8MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use K, M or G)")),
    };
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("{s:?} is not a usable size")),
        Some(v) => Ok(v),
    }
}

/// The parent directory of a pod path (`.` for a bare name: the pod's home).
fn remote_parent(path: &str) -> String {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) => "/".into(),
        Some((p, _)) => p.into(),
        None => ".".into(),
    }
}

fn join_remote(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn hex_sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

// ---- I/O -----------------------------------------------------------------------------------

/// One file to move: local path, pod path, size.
struct Item {
    local: PathBuf,
    remote: String,
    size: u64,
}

/// A file's work so far.
#[derive(Default)]
struct Tally {
    sent_chunks: u64,
    resumed_chunks: u64,
    sent_bytes: u64,
}

impl Tally {
    fn report(&self, it: &Item, chunks: u64, sha256: String) -> FileReport {
        FileReport {
            local: it.local.display().to_string(),
            remote: it.remote.clone(),
            bytes: it.size,
            sha256,
            chunks,
            sent_chunks: self.sent_chunks,
            resumed_chunks: self.resumed_chunks,
        }
    }
}

fn local_err(path: &Path, e: impl std::fmt::Display) -> AccessError {
    AccessError::Path {
        side: "local".into(),
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

fn pod_path_err(pod: &str, path: impl Into<String>, detail: impl std::fmt::Display) -> AccessError {
    AccessError::Path {
        side: format!("pod {pod}"),
        path: path.into(),
        detail: detail.to_string(),
    }
}

/// An SFTP request on a pod path failed: a status the server answered is a problem with the
/// path (not retried); anything else is the session failing under the request (a cut
/// connection: retryable, so a transfer resumes instead of giving up).
fn pod_sftp_err(pod: &str, path: impl Into<String>, e: SftpError) -> AccessError {
    match e {
        SftpError::Status(_) => pod_path_err(pod, path, e),
        other => sftp_err(pod, other),
    }
}

fn sftp_err(pod: &str, e: impl std::fmt::Display) -> AccessError {
    AccessError::Sftp {
        pod: pod.to_owned(),
        detail: e.to_string(),
    }
}

/// Hashes `buf` off the async threads, and feeds it to `whole` when given; returns both back
/// with the chunk's hex SHA-256.
async fn hash_chunk(buf: Vec<u8>, whole: Option<Sha256>) -> (Vec<u8>, String, Option<Sha256>) {
    tokio::task::spawn_blocking(move || {
        let h = hex_sha(&buf);
        let whole = whole.map(|mut w| {
            w.update(&buf);
            w
        });
        (buf, h, whole)
    })
    .await
    .unwrap_or_else(|_| (Vec::new(), String::new(), None))
}

/// Writes `buf` at `off` of pod file `path` on its own handle, closed (all writes acknowledged)
/// before it returns.
async fn write_at(
    sftp: &SftpSession,
    pod: &str,
    path: &str,
    off: u64,
    buf: &[u8],
) -> Result<(), AccessError> {
    let mut f = sftp
        .open_with_flags(path, OpenFlags::WRITE)
        .await
        .map_err(|e| pod_sftp_err(pod, path, e))?;
    f.seek(std::io::SeekFrom::Start(off))
        .await
        .map_err(|e| sftp_err(pod, e))?;
    f.write_all(buf).await.map_err(|e| sftp_err(pod, e))?;
    f.shutdown().await.map_err(|e| sftp_err(pod, e))
}

/// Chunks written and checked on the pod at once during an upload.
const UPLOADS_IN_FLIGHT: usize = 3;

/// Free bytes in the file system holding local `dir`.
async fn local_free(dir: &Path) -> Result<u64, AccessError> {
    let out = tokio::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .await
        .map_err(|e| local_err(dir, format!("running df: {e}")))?;
    parse_df(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| local_err(dir, String::from_utf8_lossy(&out.stderr).trim().to_owned()))
}

impl PodAccess {
    async fn sftp(&self, pod: &str, target: &SshTarget) -> Result<SftpSession, AccessError> {
        let stream = self
            .pool()
            .subsystem(pod, target, "sftp")
            .await
            .map_err(|e| AccessError::ssh(pod, e))?;
        let config = russh_sftp::client::Config {
            max_concurrent_reads: 32,
            max_concurrent_writes: 32,
            request_timeout_secs: 60,
            ..Default::default()
        };
        SftpSession::new_with_config(stream, config)
            .await
            .map_err(|e| sftp_err(pod, e))
    }

    /// Runs a verification command on the pod; its stdout, or an error with its stderr.
    async fn run_checked(
        &self,
        pod: &str,
        target: &SshTarget,
        command: &str,
    ) -> Result<(Option<u32>, String), AccessError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self
            .exec_on(pod, target, command, |o| match o {
                Output::Stdout(d) => stdout.extend_from_slice(d),
                Output::Stderr(d) => stderr.extend_from_slice(d),
            })
            .await?;
        let out = String::from_utf8_lossy(&stdout).trim().to_owned();
        if status.is_none() || status.is_some_and(|s| s != 0 && s != 3) {
            return Err(sftp_err(
                pod,
                format!(
                    "command on the pod failed (exit {status:?}): {}",
                    String::from_utf8_lossy(&stderr).trim()
                ),
            ));
        }
        Ok((status, out))
    }

    /// Free bytes in the pod file system holding `dir`.
    async fn remote_free(
        &self,
        pod: &str,
        target: &SshTarget,
        dir: &str,
    ) -> Result<u64, AccessError> {
        let (_, out) = self
            .run_checked(pod, target, &format!("df -Pk {}", shell_quote(dir)))
            .await
            .map_err(|e| {
                pod_path_err(pod, dir.to_owned(), format!("cannot read free space: {e}"))
            })?;
        parse_df(&format!(
            "header\n{}",
            out.lines().last().unwrap_or_default()
        ))
        .ok_or_else(|| {
            pod_path_err(
                pod,
                dir.to_owned(),
                format!("cannot read free space from df: {out}"),
            )
        })
    }

    /// Lists a pod directory (relative paths start at the pod's home).
    pub async fn list_files(&self, pod: &str, path: &str) -> Result<Vec<RemoteEntry>, AccessError> {
        let (_, target) = self.resolve(pod).await?;
        let sftp = self.sftp(pod, &target).await?;
        let span = tracing::info_span!("sftp.read_dir", pod, path);
        let dir = sftp
            .read_dir(path)
            .instrument(span)
            .await
            .map_err(|e| pod_sftp_err(pod, path.to_owned(), e))?;
        let mut entries: Vec<RemoteEntry> = dir
            .filter(|e| e.file_name() != "." && e.file_name() != "..")
            .map(|e| {
                let m = e.metadata();
                let t = e.file_type();
                RemoteEntry {
                    name: e.file_name(),
                    kind: if t.is_dir() {
                        "dir"
                    } else if t.is_file() {
                        "file"
                    } else if t.is_symlink() {
                        "symlink"
                    } else {
                        "other"
                    },
                    size: m.size.unwrap_or(0),
                    modified: m.mtime.map(u64::from),
                }
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let _ = sftp.close().await;
        Ok(entries)
    }

    /// Uploads a local file or directory to `remote` on pod `pod` (into it when it is an
    /// existing directory).
    pub async fn upload(
        &self,
        pod: &str,
        local: &Path,
        remote: &str,
        settings: &TransferSettings,
    ) -> Result<TransferReport, AccessError> {
        let started = Instant::now();
        let (_, target) = self.resolve(pod).await?;
        let meta = tokio::fs::metadata(local)
            .await
            .map_err(|e| local_err(local, e))?;
        let sftp = self.sftp(pod, &target).await?;
        let remote_is_dir = sftp.metadata(remote).await.is_ok_and(|m| m.is_dir());
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let root = if remote_is_dir && !name.is_empty() {
            join_remote(remote, &name)
        } else {
            remote.trim_end_matches('/').to_owned()
        };
        let (items, dirs) = if meta.is_dir() {
            let local = local.to_owned();
            let root2 = root.clone();
            tokio::task::spawn_blocking(move || walk_local(&local, &root2))
                .await
                .map_err(|e| local_err(Path::new("."), e))??
        } else {
            (
                vec![Item {
                    local: local.to_owned(),
                    remote: root.clone(),
                    size: meta.len(),
                }],
                Vec::new(),
            )
        };
        // Free space: what is still to write, against the file system the files go to.
        let mut needed = 0u64;
        for it in &items {
            let have = sftp
                .metadata(format!("{}{PART_SUFFIX}", it.remote))
                .await
                .map(|m| m.size.unwrap_or(0))
                .unwrap_or(0);
            needed += it.size.saturating_sub(have);
        }
        let space_dir = if meta.is_dir() && !sftp.metadata(&root).await.is_ok_and(|m| m.is_dir()) {
            remote_parent(&root)
        } else if meta.is_dir() {
            root.clone()
        } else {
            remote_parent(&root)
        };
        let available = self.remote_free(pod, &target, &space_dir).await?;
        if needed > available {
            return Err(AccessError::DiskFull {
                side: format!("pod {pod}"),
                path: root,
                needed,
                available,
            });
        }
        for d in &dirs {
            if !sftp.metadata(d).await.is_ok_and(|m| m.is_dir()) {
                sftp.create_dir(d).await.map_err(|e| {
                    pod_path_err(pod, d.clone(), format!("cannot create directory: {e}"))
                })?;
            }
        }
        self.transfer_items(
            Direction::Upload,
            sftp,
            pod,
            &target,
            &items,
            settings,
            started,
        )
        .await
    }

    async fn upload_file(
        &self,
        sftp: &Arc<SftpSession>,
        job: FileJob<'_>,
        it: &Item,
    ) -> Result<(FileReport, Tally), AccessError> {
        let FileJob {
            pod,
            target,
            settings,
            progress,
        } = job;
        let chunk = settings.chunk_size.max(1);
        let part = format!("{}{PART_SUFFIX}", it.remote);
        let journal = format!("{}{JOURNAL_SUFFIX}", it.remote);
        let n = chunk_count(it.size, chunk);
        let done = match sftp.read(journal.as_str()).await {
            Ok(bytes) => parse_journal(&String::from_utf8_lossy(&bytes), it.size, chunk),
            Err(_) => BTreeMap::new(),
        };
        let fresh = done.is_empty();
        if fresh {
            let mut j = sftp
                .create(journal.as_str())
                .await
                .map_err(|e| pod_sftp_err(pod, journal.clone(), e))?;
            j.write_all(journal_header(it.size, chunk).as_bytes())
                .await
                .map_err(|e| sftp_err(pod, format!("writing {journal}: {e}")))?;
            j.shutdown()
                .await
                .map_err(|e| sftp_err(pod, format!("writing {journal}: {e}")))?;
        }
        // The part file exists (emptied when starting over) before chunks are written into it.
        let flags = if fresh {
            OpenFlags::CREATE | OpenFlags::WRITE | OpenFlags::TRUNCATE
        } else {
            OpenFlags::CREATE | OpenFlags::WRITE
        };
        sftp.open_with_flags(part.as_str(), flags)
            .await
            .map_err(|e| pod_sftp_err(pod, part.clone(), e))?
            .shutdown()
            .await
            .map_err(|e| sftp_err(pod, e))?;
        let mut src = tokio::fs::File::open(&it.local)
            .await
            .map_err(|e| local_err(&it.local, e))?;
        let mut whole = Some(Sha256::new());
        let mut tally = Tally::default();
        // Each chunk is written on its own handle, then checked on the pod; a few at once, while
        // the next ones are read and hashed here.
        let mut in_flight = tokio::task::JoinSet::new();
        for i in 0..n {
            let (off, len) = chunk_span(i, it.size, chunk);
            let mut buf = vec![0u8; len];
            src.read_exact(&mut buf)
                .await
                .map_err(|e| local_err(&it.local, e))?;
            let (buf, h, w) = hash_chunk(buf, whole.take()).await;
            whole = w;
            progress.inc(len as u64);
            if done.get(&i) == Some(&h) {
                tally.resumed_chunks += 1;
                continue;
            }
            tally.sent_chunks += 1;
            tally.sent_bytes += len as u64;
            while in_flight.len() >= UPLOADS_IN_FLIGHT {
                join_check(in_flight.join_next().await, pod, &it.remote)?;
            }
            let (access, sftp) = (self.clone(), sftp.clone());
            let (pod2, target2, part2) = (pod.to_owned(), target.clone(), part.clone());
            let cmd = verify_chunk_command(&part, &journal, chunk, i, &h);
            in_flight.spawn(async move {
                write_at(&sftp, &pod2, &part2, off, &buf).await?;
                drop(buf);
                let (_, got) = access.run_checked(&pod2, &target2, &cmd).await?;
                Ok::<_, AccessError>((i, h, got))
            });
        }
        while let Some(r) = in_flight.join_next().await {
            join_check(Some(r), pod, &it.remote)?;
        }
        let whole = whole.ok_or_else(|| sftp_err(pod, "hashing failed"))?;
        let sha = hex::encode(whole.finalize());
        let (status, got) = self
            .run_checked(
                pod,
                target,
                &finish_upload_command(&part, &journal, &it.remote, &sha),
            )
            .await?;
        if status == Some(3) {
            return Err(AccessError::Integrity {
                path: it.remote.clone(),
                detail: format!("the pod has SHA-256 {got}, this machine sent {sha}"),
            });
        }
        Ok((tally.report(it, n, sha), tally))
    }

    /// Downloads `remote` (a file or directory) from pod `pod` to `local` (into it when it is an
    /// existing directory).
    pub async fn download(
        &self,
        pod: &str,
        remote: &str,
        local: &Path,
        settings: &TransferSettings,
    ) -> Result<TransferReport, AccessError> {
        let started = Instant::now();
        let (_, target) = self.resolve(pod).await?;
        let sftp = self.sftp(pod, &target).await?;
        let meta = sftp
            .metadata(remote)
            .await
            .map_err(|e| pod_sftp_err(pod, remote.to_owned(), e))?;
        let name = remote
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let root = if local.is_dir() && !name.is_empty() && name != "." && name != ".." {
            local.join(&name)
        } else {
            local.to_owned()
        };
        let (items, dirs) = if meta.is_dir() {
            walk_remote(&sftp, pod, remote, &root).await?
        } else {
            (
                vec![Item {
                    local: root.clone(),
                    remote: remote.to_owned(),
                    size: meta.size.unwrap_or(0),
                }],
                Vec::new(),
            )
        };
        let mut needed = 0u64;
        for it in &items {
            let have = std::fs::metadata(part_path(&it.local))
                .map(|m| m.len())
                .unwrap_or(0);
            needed += it.size.saturating_sub(have);
        }
        let mut space_dir = root.clone();
        while !space_dir.is_dir() {
            match space_dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => space_dir = p.to_owned(),
                _ => {
                    space_dir = PathBuf::from(".");
                    break;
                }
            }
        }
        let available = local_free(&space_dir).await?;
        if needed > available {
            return Err(AccessError::DiskFull {
                side: "local".into(),
                path: root.display().to_string(),
                needed,
                available,
            });
        }
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(|e| local_err(d, e))?;
        }
        self.transfer_items(
            Direction::Download,
            sftp,
            pod,
            &target,
            &items,
            settings,
            started,
        )
        .await
    }

    /// Moves every item one way, each file retried (resuming from its journal) after a dropped
    /// connection or a failed check, up to `settings.retries` times.
    #[allow(clippy::too_many_arguments)]
    async fn transfer_items(
        &self,
        direction: Direction,
        sftp: SftpSession,
        pod: &str,
        target: &SshTarget,
        items: &[Item],
        settings: &TransferSettings,
        started: Instant,
    ) -> Result<TransferReport, AccessError> {
        let total: u64 = items.iter().map(|i| i.size).sum();
        let what = match direction {
            Direction::Upload => "upload",
            Direction::Download => "download",
        };
        let progress = Progress::new(settings.progress, total, what);
        let job = FileJob {
            pod,
            target,
            settings,
            progress: &progress,
        };
        let mut sftp = Arc::new(sftp);
        let mut reports = Vec::new();
        let mut sent_bytes = 0;
        for it in items {
            let mut attempt = 0;
            loop {
                let span = tracing::info_span!("sftp.transfer", direction = what, pod, remote = %it.remote, bytes = it.size);
                let done = match direction {
                    Direction::Upload => self.upload_file(&sftp, job, it).instrument(span).await,
                    Direction::Download => {
                        self.download_file(&sftp, job, it).instrument(span).await
                    }
                };
                match done {
                    Ok((r, t)) => {
                        sent_bytes += t.sent_bytes;
                        reports.push(r);
                        break;
                    }
                    Err(e)
                        if attempt < settings.retries
                            && (e.is_retryable() || e.kind() == "integrity") =>
                    {
                        attempt += 1;
                        tracing::warn!(pod, file = %it.remote, error = %e, attempt, "{what} interrupted; resuming from the verified chunks");
                        tokio::time::sleep(std::time::Duration::from_millis(
                            200 * u64::from(attempt),
                        ))
                        .await;
                        sftp = Arc::new(self.sftp(pod, target).await?);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let _ = sftp.close().await;
        Ok(TransferReport::new(
            direction, pod, reports, sent_bytes, started,
        ))
    }

    async fn download_file(
        &self,
        sftp: &Arc<SftpSession>,
        job: FileJob<'_>,
        it: &Item,
    ) -> Result<(FileReport, Tally), AccessError> {
        let FileJob {
            pod,
            target,
            settings,
            progress,
        } = job;
        let chunk = settings.chunk_size.max(1);
        let part = part_path(&it.local);
        let journal = journal_path(&it.local);
        let n = chunk_count(it.size, chunk);
        let done = std::fs::read_to_string(&journal)
            .map(|t| parse_journal(&t, it.size, chunk))
            .unwrap_or_default();
        if done.is_empty() {
            std::fs::write(&journal, journal_header(it.size, chunk))
                .map_err(|e| local_err(&journal, e))?;
        }
        let mut dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(done.is_empty())
            .open(&part)
            .map_err(|e| local_err(&part, e))?;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .map_err(|e| local_err(&journal, e))?;
        // The pod hashes its copy chunk by chunk (then whole) while the bytes come over.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let access = self.clone();
        let (pod2, target2) = (pod.to_owned(), target.clone());
        let cmd = hashes_command(&it.remote, chunk, n);
        let hasher = tokio::spawn(async move {
            let mut line = Vec::new();
            let mut stderr = Vec::new();
            let status = access
                .exec_on(&pod2, &target2, &cmd, |o| match o {
                    Output::Stdout(d) => {
                        for b in d {
                            if *b == b'\n' {
                                let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                                line.clear();
                            } else {
                                line.push(*b);
                            }
                        }
                    }
                    Output::Stderr(d) => stderr.extend_from_slice(d),
                })
                .await?;
            Ok::<_, AccessError>((status, String::from_utf8_lossy(&stderr).trim().to_owned()))
        });
        let mut src = sftp
            .open(it.remote.as_str())
            .await
            .map_err(|e| pod_sftp_err(pod, it.remote.clone(), e))?;
        let mut whole = Some(Sha256::new());
        let mut tally = Tally::default();
        // Where the next SFTP read starts: sequential reads keep the read-ahead going.
        let mut at = 0u64;
        for i in 0..n {
            let (off, len) = chunk_span(i, it.size, chunk);
            let Some(expected) = rx.recv().await else {
                return Err(hasher_failed(hasher, pod, &it.remote).await);
            };
            if done.get(&i) == Some(&expected) {
                let mut buf = vec![0u8; len];
                use std::io::{Read, Seek};
                let ok = dst.seek(std::io::SeekFrom::Start(off)).is_ok()
                    && dst.read_exact(&mut buf).is_ok();
                let (_, h, w) = hash_chunk(buf, whole.clone()).await;
                if ok && h == expected {
                    whole = w;
                    tally.resumed_chunks += 1;
                    progress.inc(len as u64);
                    continue;
                }
            }
            let mut buf = vec![0u8; len];
            if at != off {
                src.seek(std::io::SeekFrom::Start(off))
                    .await
                    .map_err(|e| sftp_err(pod, e))?;
            }
            src.read_exact(&mut buf)
                .await
                .map_err(|e| sftp_err(pod, e))?;
            at = off + len as u64;
            let (buf, h, w) = hash_chunk(buf, whole.take()).await;
            whole = w;
            if h != expected {
                return Err(AccessError::Integrity {
                    path: it.remote.clone(),
                    detail: format!("chunk {i}: received SHA-256 {h}, the pod has {expected}"),
                });
            }
            {
                use std::io::{Seek, Write};
                dst.seek(std::io::SeekFrom::Start(off))
                    .and_then(|_| dst.write_all(&buf))
                    .map_err(|e| local_err(&part, e))?;
                // One write per line: `writeln!` writes the index, the space, the hash and
                // the newline separately, and a kill between them leaves half a line.
                log.write_all(format!("{i} {h}\n").as_bytes())
                    .map_err(|e| local_err(&journal, e))?;
            }
            tally.sent_chunks += 1;
            tally.sent_bytes += len as u64;
            progress.inc(len as u64);
        }
        let whole = whole.ok_or_else(|| local_err(&part, "hashing failed"))?;
        let Some(remote_whole) = rx.recv().await else {
            return Err(hasher_failed(hasher, pod, &it.remote).await);
        };
        let _ = src.shutdown().await;
        let sha = hex::encode(whole.finalize());
        if sha != remote_whole {
            let _ = std::fs::remove_file(&journal);
            return Err(AccessError::Integrity {
                path: it.local.display().to_string(),
                detail: format!("this machine has SHA-256 {sha}, the pod has {remote_whole}"),
            });
        }
        dst.set_len(it.size).map_err(|e| local_err(&part, e))?;
        drop(dst);
        std::fs::rename(&part, &it.local).map_err(|e| local_err(&it.local, e))?;
        let _ = std::fs::remove_file(&journal);
        Ok((tally.report(it, n, sha), tally))
    }
}

fn part_path(local: &Path) -> PathBuf {
    let mut s = local.as_os_str().to_owned();
    s.push(PART_SUFFIX);
    PathBuf::from(s)
}

fn journal_path(local: &Path) -> PathBuf {
    let mut s = local.as_os_str().to_owned();
    s.push(JOURNAL_SUFFIX);
    PathBuf::from(s)
}

/// The error of a pod hashing command that ended before printing every hash.
async fn hasher_failed(
    task: tokio::task::JoinHandle<Result<(Option<u32>, String), AccessError>>,
    pod: &str,
    path: &str,
) -> AccessError {
    match task.await {
        Ok(Err(e)) => e,
        Ok(Ok((status, stderr))) => pod_path_err(
            pod,
            path.to_owned(),
            format!("hashing on the pod failed (exit {status:?}): {stderr}"),
        ),
        Err(e) => sftp_err(pod, e),
    }
}

/// What a pod-side chunk check saw: chunk index, the hash sent, the hash on the pod.
type CheckOutcome = Result<(u64, String, String), AccessError>;

/// The outcome of one pod-side chunk check.
fn join_check(
    r: Option<Result<CheckOutcome, tokio::task::JoinError>>,
    pod: &str,
    path: &str,
) -> Result<(), AccessError> {
    match r {
        None => Ok(()),
        Some(Err(e)) => Err(sftp_err(pod, e)),
        Some(Ok(Err(e))) => Err(e),
        Some(Ok(Ok((i, want, got)))) if got != want => Err(AccessError::Integrity {
            path: path.to_owned(),
            detail: format!("chunk {i}: the pod has SHA-256 {got}, this machine sent {want}"),
        }),
        Some(Ok(Ok(_))) => Ok(()),
    }
}

/// Files and directories under local `root`, mapped under pod `dest`.
fn walk_local(root: &Path, dest: &str) -> Result<(Vec<Item>, Vec<String>), AccessError> {
    let mut items = Vec::new();
    let mut dirs = vec![dest.to_owned()];
    let mut todo = vec![(root.to_owned(), dest.to_owned())];
    while let Some((dir, rdir)) = todo.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| local_err(&dir, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| local_err(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let meta = std::fs::metadata(&path).map_err(|err| local_err(&path, err))?;
            let r = join_remote(&rdir, &name);
            if meta.is_dir() {
                dirs.push(r.clone());
                todo.push((path, r));
            } else if meta.is_file() {
                items.push(Item {
                    local: path,
                    remote: r,
                    size: meta.len(),
                });
            }
        }
    }
    Ok((items, dirs))
}

/// Files and directories under pod `root`, mapped under local `dest`.
async fn walk_remote(
    sftp: &SftpSession,
    pod: &str,
    root: &str,
    dest: &Path,
) -> Result<(Vec<Item>, Vec<PathBuf>), AccessError> {
    let mut items = Vec::new();
    let mut dirs = vec![dest.to_owned()];
    let mut todo = vec![(root.trim_end_matches('/').to_owned(), dest.to_owned())];
    while let Some((rdir, ldir)) = todo.pop() {
        let entries = sftp
            .read_dir(rdir.as_str())
            .await
            .map_err(|e| pod_sftp_err(pod, rdir.clone(), e))?;
        for e in entries {
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let r = join_remote(&rdir, &name);
            let l = ldir.join(&name);
            let t = e.file_type();
            if t.is_dir() {
                dirs.push(l.clone());
                todo.push((r, l));
            } else if t.is_file() {
                items.push(Item {
                    local: l,
                    remote: r,
                    size: e.metadata().size.unwrap_or(0),
                });
            }
        }
    }
    items.sort_by(|a, b| a.remote.cmp(&b.remote));
    Ok((items, dirs))
}

/// What every file of one transfer shares: the pod, its SSH endpoint, the settings and the
/// progress display (the SFTP session is passed apart: a retry opens a new one).
#[derive(Clone, Copy)]
struct FileJob<'a> {
    pod: &'a str,
    target: &'a SshTarget,
    settings: &'a TransferSettings,
    progress: &'a Progress,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_status_is_a_path_problem_and_a_failing_session_is_retried() {
        let status = SftpError::Status(russh_sftp::protocol::Status {
            id: 1,
            status_code: russh_sftp::protocol::StatusCode::NoSuchFile,
            error_message: "no such file".to_owned(),
            language_tag: "en".to_owned(),
        });
        let e = pod_sftp_err("p1", "a/b", status);
        assert!(
            matches!(&e, AccessError::Path { path, .. } if path == "a/b"),
            "{e:?}"
        );
        assert!(!e.is_retryable());
        for cut in [
            SftpError::UnexpectedBehavior("sender dropped".to_owned()),
            SftpError::IO("broken pipe".to_owned()),
            SftpError::Timeout,
        ] {
            let e = pod_sftp_err("p1", "a/b", cut);
            assert!(e.is_retryable(), "{e:?}");
        }
    }

    fn sh(script: &str) -> (i32, String) {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }

    #[test]
    fn chunks_cover_the_file_exactly() {
        assert_eq!(chunk_count(0, 8), 0);
        assert_eq!(chunk_count(8, 8), 1);
        assert_eq!(chunk_count(17, 8), 3);
        assert_eq!(chunk_span(2, 17, 8), (16, 1));
        assert_eq!(chunk_span(0, 17, 8), (0, 8));
    }

    #[test]
    fn journals_only_count_for_the_same_file_and_chunk_size() {
        let h = "a".repeat(64);
        let text = format!(
            "{}0 {h}\n2 {h}\n9 {h}\n1 abc\n3 {}",
            journal_header(20, 8),
            &h[..10]
        );
        let done = parse_journal(&text, 20, 8);
        assert_eq!(
            done.keys().copied().collect::<Vec<_>>(),
            vec![0, 2],
            "out of range and cut lines dropped"
        );
        assert!(parse_journal(&text, 21, 8).is_empty(), "another size");
        assert!(parse_journal(&text, 20, 4).is_empty(), "another chunk size");
        assert!(parse_journal("", 20, 8).is_empty());
    }

    #[test]
    fn sizes_and_df_parse() {
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("8 parsecs").is_err());
        let df =
            "Filesystem 1024-blocks Used Available Capacity Mounted on\ntmpfs 5120 0 5120 0% /x\n";
        assert_eq!(parse_df(df), Some(5120 * 1024));
        assert_eq!(parse_df("garbage"), None);
        assert_eq!(remote_parent("a/b/c"), "a/b");
        assert_eq!(remote_parent("c"), ".");
        assert_eq!(remote_parent("/c"), "/");
    }

    #[test]
    fn pod_commands_verify_chunks_and_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..20u32).map(|i| (i * 7) as u8).collect();
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        std::fs::write(p("f it's"), &data).unwrap();
        let (part, journal, dst) = (p("f it's"), p("j"), p("dst"));
        std::fs::write(&journal, journal_header(20, 8)).unwrap();

        // Chunk 1 matches: recorded; a wrong expectation is printed back, not recorded.
        let good = hex_sha(&data[8..16]);
        let (code, out) = sh(&verify_chunk_command(&part, &journal, 8, 1, &good));
        assert_eq!((code, out.as_str()), (0, good.as_str()));
        let (_, out) = sh(&verify_chunk_command(
            &part,
            &journal,
            8,
            2,
            &"0".repeat(64),
        ));
        assert_eq!(out, hex_sha(&data[16..]));
        let done = parse_journal(&std::fs::read_to_string(&journal).unwrap(), 20, 8);
        assert_eq!(done.get(&1), Some(&good));
        assert_eq!(done.len(), 1);

        // The pod's hash listing: every chunk, then the whole file.
        let (code, out) = sh(&hashes_command(&part, 8, 3));
        assert_eq!(code, 0);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            vec![
                hex_sha(&data[..8]),
                hex_sha(&data[8..16]),
                hex_sha(&data[16..]),
                hex_sha(&data)
            ]
        );
        assert_eq!(sh(&hashes_command(&p("missing"), 8, 1)).0, 2);
        // A pod without OpenSSL hashes with coreutils' sha256sum: the same answers.
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for tool in ["dd", "sha256sum", "cut"] {
            let (_, at) = sh(&format!("command -v {tool}"));
            std::os::unix::fs::symlink(at, bin.join(tool)).unwrap();
        }
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(hashes_command(&part, 8, 3))
            .env("PATH", &bin)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            lines.join("\n")
        );

        // Finishing: a wrong whole hash exits 3 and forgets the journal; the right one renames.
        let (code, out) = sh(&finish_upload_command(
            &part,
            &journal,
            &dst,
            &"0".repeat(64),
        ));
        assert_eq!((code, out), (3, hex_sha(&data)));
        assert!(!Path::new(&journal).exists());
        std::fs::write(&journal, "x").unwrap();
        let (code, _) = sh(&finish_upload_command(
            &part,
            &journal,
            &dst,
            &hex_sha(&data),
        ));
        assert_eq!(code, 0);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        assert!(!Path::new(&part).exists() && !Path::new(&journal).exists());
    }
}
