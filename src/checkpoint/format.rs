//! The checkpoint format: what a generation holds and where its objects live. Pure: names,
//! validation and chunk arithmetic, no I/O.
//!
//! ```text
//! <prefix>/<job>/<seq:020>/claim.json      written first, create-only: reserves the seq
//! <prefix>/<job>/<seq:020>/<token>.data    the snapshot: every file concatenated in path order,
//!                                          uploaded as one multipart object, part = chunk
//! <prefix>/<job>/<seq:020>/manifest.json   written last, create-only, after every part is
//!                                          verified: the generation is complete
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::CheckpointError;
use crate::model::Timestamp;

/// Version of the manifest and claim documents.
pub const FORMAT_VERSION: u32 = 1;
/// S3 allows at most this many parts per multipart upload.
pub const MAX_PARTS: u64 = 10_000;
/// Longest job id: keys stay far below S3's 1024-byte limit with the prefix and the seq.
pub const MAX_JOB_LEN: usize = 128;
/// Seqs are zero-padded to this many digits (a u64 has at most 20) so that keys sort in seq
/// order.
const SEQ_DIGITS: usize = 20;

/// One regular file of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the checkpointed directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// Where the file starts in the data object.
    pub offset: u64,
    /// Unix permission bits (`0o755`, …).
    pub mode: u32,
}

/// One part of the data object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Multipart part number (1-based).
    pub part: u32,
    /// First byte in the data object.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
}

/// A complete checkpoint: written last, only after every part was verified in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// The job this checkpoint belongs to.
    pub job: String,
    /// Generation number: the newest complete one is the job's latest checkpoint.
    pub seq: u64,
    /// When the writer started this generation.
    pub created: Timestamp,
    /// Pod id or host that wrote it.
    pub writer: String,
    /// Every regular file, in path order (= their order in the data object).
    pub files: Vec<FileEntry>,
    /// Every directory (so empty ones come back too), in path order.
    #[serde(default)]
    pub dirs: Vec<String>,
    /// Free-form metadata from the writer (`--meta step=1200`).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Key of the data object relative to the generation (`<token>.data`); `None` when the
    /// snapshot holds no bytes.
    pub data: Option<String>,
    /// The writer's random token (also in the data object's name and the claim).
    pub token: String,
    /// Bytes in the data object (sum of file sizes).
    pub total_size: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u64,
    /// The data object's parts, in order.
    pub chunks: Vec<Chunk>,
}

impl Manifest {
    /// Checks what a reader relies on: ids, paths (nothing escapes the target directory),
    /// file and chunk arithmetic. A manifest from the store passes this before any use.
    pub fn check(&self) -> Result<(), CheckpointError> {
        let bad = |problem: String| CheckpointError::BadManifest {
            job: self.job.clone(),
            seq: self.seq,
            problem,
        };
        if self.format != FORMAT_VERSION {
            return Err(bad(format!(
                "format {} is not {FORMAT_VERSION} (written by another version)",
                self.format
            )));
        }
        validate_job(&self.job)?;
        check_token(&self.token).map_err(|p| bad(p.into()))?;
        let mut at = 0u64;
        let mut previous: Option<&str> = None;
        for f in &self.files {
            check_relative_path(&f.path).map_err(|p| bad(format!("file {:?} {p}", f.path)))?;
            if previous.is_some_and(|p| p >= f.path.as_str()) {
                return Err(bad(format!(
                    "file {:?} is out of order or repeated",
                    f.path
                )));
            }
            if f.offset != at {
                return Err(bad(format!(
                    "file {:?} starts at {} instead of {at}",
                    f.path, f.offset
                )));
            }
            if !is_sha256_hex(&f.sha256) {
                return Err(bad(format!("file {:?} has no valid sha256", f.path)));
            }
            at = at
                .checked_add(f.size)
                .ok_or_else(|| bad("file sizes overflow".into()))?;
            previous = Some(&f.path);
        }
        for d in &self.dirs {
            check_relative_path(d).map_err(|p| bad(format!("directory {d:?} {p}")))?;
        }
        if at != self.total_size {
            return Err(bad(format!(
                "files add up to {at} bytes, total_size says {}",
                self.total_size
            )));
        }
        let expected = chunk_layout(self.total_size, self.chunk_size)
            .ok_or_else(|| bad(format!("chunk_size {} is unusable", self.chunk_size)))?;
        if expected.len() != self.chunks.len()
            || expected
                .iter()
                .zip(&self.chunks)
                .any(|(&(part, offset, size), c)| {
                    c.part != part || c.offset != offset || c.size != size
                })
        {
            return Err(bad("the chunk list does not tile the data object".into()));
        }
        if self.chunks.iter().any(|c| !is_sha256_hex(&c.sha256)) {
            return Err(bad("a chunk has no valid sha256".into()));
        }
        match (&self.data, self.total_size) {
            (None, 0) => {}
            (Some(d), n) if n > 0 && *d == data_name(&self.token) => {}
            _ => return Err(bad("the data object name does not match the token".into())),
        }
        Ok(())
    }
}

/// What a claim records: who reserved a seq, with which upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Job.
    pub job: String,
    /// The reserved generation.
    pub seq: u64,
    /// Who reserved it.
    pub writer: String,
    /// The writer's random token (its data object is `<token>.data`).
    pub token: String,
    /// The multipart upload of the data object (none for a snapshot without bytes).
    pub upload_id: Option<String>,
    /// Chunk size of that upload (a resumed upload must use the same).
    pub chunk_size: u64,
    /// When it was claimed.
    pub created: Timestamp,
}

/// Object names under one store prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    base: String,
}

/// What an object key under the prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// `claim.json`.
    Claim,
    /// `manifest.json`.
    Manifest,
    /// `<token>.data`.
    Data(String),
    /// Anything else inside a generation (left alone except by gc of the generation).
    Other,
}

impl Layout {
    /// Names under `prefix` (validated by the configuration: no empty or dot segments).
    pub fn new(prefix: &str) -> Layout {
        let base = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Layout { base }
    }

    /// Prefix of every key (empty or ending in `/`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Prefix of every key of `job`.
    pub fn job_prefix(&self, job: &str) -> String {
        format!("{}{job}/", self.base)
    }

    /// Prefix of every key of one generation.
    pub fn generation(&self, job: &str, seq: u64) -> String {
        format!("{}{job}/{seq:0width$}/", self.base, width = SEQ_DIGITS)
    }

    /// The claim of a generation.
    pub fn claim(&self, job: &str, seq: u64) -> String {
        format!("{}claim.json", self.generation(job, seq))
    }

    /// The manifest of a generation.
    pub fn manifest(&self, job: &str, seq: u64) -> String {
        format!("{}manifest.json", self.generation(job, seq))
    }

    /// The data object of a generation written with `token`.
    pub fn data(&self, job: &str, seq: u64, token: &str) -> String {
        format!("{}{}", self.generation(job, seq), data_name(token))
    }

    /// Splits a listed key into (job, seq, kind); `None` for keys that are not ours.
    pub fn parse(&self, key: &str) -> Option<(String, u64, KeyKind)> {
        let rest = key.strip_prefix(&self.base)?;
        let mut it = rest.splitn(3, '/');
        let (job, seq, name) = (it.next()?, it.next()?, it.next()?);
        if validate_job(job).is_err() || seq.len() != SEQ_DIGITS {
            return None;
        }
        let seq: u64 = seq.parse().ok()?;
        let kind = match name {
            "claim.json" => KeyKind::Claim,
            "manifest.json" => KeyKind::Manifest,
            n => match n.strip_suffix(".data") {
                Some(t) if check_token(t).is_ok() => KeyKind::Data(t.to_owned()),
                _ => KeyKind::Other,
            },
        };
        Some((job.to_owned(), seq, kind))
    }
}

/// `<token>.data`.
pub fn data_name(token: &str) -> String {
    format!("{token}.data")
}

/// Job ids name a key segment: 1–128 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit
/// (so never `.` or `..`).
pub fn validate_job(job: &str) -> Result<(), CheckpointError> {
    let invalid = |problem: &str| CheckpointError::InvalidJob {
        job: job.chars().take(MAX_JOB_LEN + 8).collect(),
        problem: problem.to_owned(),
    };
    if job.is_empty() {
        return Err(invalid("is empty"));
    }
    if job.len() > MAX_JOB_LEN {
        return Err(invalid("is longer than 128 characters"));
    }
    if !job.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid("must start with a letter or digit"));
    }
    if !job
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "may only hold letters, digits, '.', '_' and '-' (no '/', spaces or other characters)",
        ));
    }
    Ok(())
}

/// A writer token: 16 lowercase hex digits.
fn check_token(t: &str) -> Result<(), &'static str> {
    if t.len() == 16
        && t.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        Ok(())
    } else {
        Err("has an invalid writer token")
    }
}

/// A path relative to the checkpointed directory that cannot escape it: `/`-separated, no
/// empty, `.` or `..` segment, no leading `/`, no NUL or backslash.
pub fn check_relative_path(p: &str) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("is empty");
    }
    if p.len() > 4096 {
        return Err("is longer than 4096 bytes");
    }
    if p.contains('\0') || p.contains('\\') {
        return Err("contains a NUL or a backslash");
    }
    if p.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err("is absolute or has an empty, '.' or '..' segment");
    }
    Ok(())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// The chunk size for `total` bytes: `part_size`, grown (to a whole MiB) when the snapshot
/// would need more than [`MAX_PARTS`] parts.
pub fn chunk_size_for(total: u64, part_size: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    if total.div_ceil(part_size.max(1)) <= MAX_PARTS {
        return part_size;
    }
    total.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB
}

/// (part number, offset, size) of every chunk of `total` bytes; `None` when the chunk size is
/// 0 or the parts would exceed [`MAX_PARTS`].
pub fn chunk_layout(total: u64, chunk_size: u64) -> Option<Vec<(u32, u64, u64)>> {
    if chunk_size == 0 {
        return None;
    }
    let count = total.div_ceil(chunk_size);
    if count > MAX_PARTS {
        return None;
    }
    Some(
        (0..count)
            .map(|i| {
                let offset = i * chunk_size;
                // i < 10,000, so the part number fits.
                let part = u32::try_from(i + 1).unwrap_or(u32::MAX);
                (part, offset, chunk_size.min(total - offset))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        for ok in ["a", "job-1", "Train.v2_run-7", &"x".repeat(128)] {
            validate_job(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "-a",
            "a b",
            "ä",
            &"x".repeat(129),
            ".hidden",
        ] {
            let e = validate_job(bad).unwrap_err();
            assert!(matches!(e, CheckpointError::InvalidJob { .. }), "{bad:?}");
            assert!(!e.is_retryable());
        }
    }

    #[test]
    fn paths() {
        for ok in ["a", "a/b.txt", "x/.hidden", "d/..e"] {
            check_relative_path(ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "a\0",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_round_trip_and_sort_by_seq() {
        let l = Layout::new("prod/ckpt");
        assert_eq!(
            l.manifest("j1", 7),
            "prod/ckpt/j1/00000000000000000007/manifest.json"
        );
        assert!(l.generation("j", 9) < l.generation("j", 10));
        assert_eq!(
            l.parse(&l.data("j1", 42, "0123456789abcdef")),
            Some(("j1".into(), 42, KeyKind::Data("0123456789abcdef".into())))
        );
        assert_eq!(
            l.parse(&l.claim("j1", 1)),
            Some(("j1".into(), 1, KeyKind::Claim))
        );
        assert_eq!(l.parse("prod/ckpt/j1/7/manifest.json"), None);
        assert_eq!(
            l.parse("elsewhere/j1/00000000000000000007/manifest.json"),
            None
        );
        let root = Layout::new("");
        assert_eq!(root.job_prefix("j"), "j/");
        assert_eq!(
            root.parse("j/00000000000000000003/x.bin"),
            Some(("j".into(), 3, KeyKind::Other))
        );
    }

    #[test]
    fn chunking() {
        const MIB: u64 = 1 << 20;
        assert_eq!(chunk_layout(0, 8 * MIB).unwrap(), vec![]);
        assert_eq!(
            chunk_layout(10, 4).unwrap(),
            vec![(1, 0, 4), (2, 4, 4), (3, 8, 2)]
        );
        assert_eq!(chunk_size_for(100 * MIB, 8 * MIB), 8 * MIB);
        // 1 TiB at 8 MiB would be 131,072 parts: grown to fit 10,000.
        let big = 1u64 << 40;
        let c = chunk_size_for(big, 8 * MIB);
        assert!(big.div_ceil(c) <= MAX_PARTS && c.is_multiple_of(MIB), "{c}");
        assert!(chunk_layout(big, 8 * MIB).is_none());
        assert!(chunk_layout(1, 0).is_none());
    }

    fn sample() -> Manifest {
        let h = "a".repeat(64);
        Manifest {
            format: FORMAT_VERSION,
            job: "j".into(),
            seq: 1,
            created: Timestamp::from_secs(1),
            writer: "pod-1".into(),
            files: vec![
                FileEntry {
                    path: "a".into(),
                    size: 6,
                    sha256: h.clone(),
                    offset: 0,
                    mode: 0o644,
                },
                FileEntry {
                    path: "b/c".into(),
                    size: 4,
                    sha256: h.clone(),
                    offset: 6,
                    mode: 0o755,
                },
            ],
            dirs: vec!["b".into()],
            meta: BTreeMap::new(),
            data: Some("0123456789abcdef.data".into()),
            token: "0123456789abcdef".into(),
            total_size: 10,
            chunk_size: 4,
            chunks: vec![
                Chunk {
                    part: 1,
                    offset: 0,
                    size: 4,
                    sha256: h.clone(),
                },
                Chunk {
                    part: 2,
                    offset: 4,
                    size: 4,
                    sha256: h.clone(),
                },
                Chunk {
                    part: 3,
                    offset: 8,
                    size: 2,
                    sha256: h,
                },
            ],
        }
    }

    #[test]
    fn manifest_checks_refuse_what_a_reader_cannot_trust() {
        sample().check().unwrap();
        type Edit = fn(&mut Manifest);
        let edits: [(Edit, &str); 8] = [
            (|m| m.files[1].path = "../../etc/passwd".into(), "file"),
            (|m| m.files[1].path = "/abs".into(), "file"),
            (|m| m.files[1].offset = 5, "starts at"),
            (|m| m.total_size = 11, "add up"),
            (|m| m.chunks.pop().map(|_| ()).unwrap_or(()), "tile"),
            (|m| m.data = Some("fedcba9876543210.data".into()), "token"),
            (|m| m.format = 99, "format"),
            (|m| m.files[1].path = "a".into(), "repeated"),
        ];
        for (edit, expect) in edits {
            let mut m = sample();
            edit(&mut m);
            let e = m.check().unwrap_err().to_string();
            assert!(e.contains(expect), "expected {expect:?} in {e}");
        }
    }
}
