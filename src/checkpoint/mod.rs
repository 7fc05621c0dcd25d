//! GPU job checkpoints in an S3-compatible store (MinIO in production): the
//! [`CheckpointStore`] trait, its one implementation [`S3Store`] (the only user of `aws-sdk-s3`,
//! `aws-config` and `indicatif`), the format (see [`format`]) and the transfers.
//!
//! A checkpoint of job J is a directory snapshot in numbered, write-once generations
//! `<prefix>/<J>/<seq>/`: a claim (create-only, reserves the seq), the data object (the files
//! concatenated in path order, one multipart upload whose parts are the chunks, each with its
//! SHA-256) and a manifest (create-only) written last, after every part is verified. The latest
//! checkpoint is the highest seq with a manifest; there is no mutable pointer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

mod error;
pub mod format;
mod local;
/// Transfer progress bars (also used by pod file transfers).
pub mod progress;
mod s3;

pub use error::CheckpointError;
pub use format::{validate_job, Chunk, FileEntry, Manifest};
pub use s3::S3Store;

use crate::model::Timestamp;

/// Something a transfer reports as it goes (tests count parts with it; the CLI shows a bar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// A part was sent and accepted.
    PartUploaded {
        /// Part number.
        part: u32,
        /// Its size.
        bytes: u64,
    },
    /// A part already in the store from an interrupted upload was kept.
    PartSkipped {
        /// Part number.
        part: u32,
    },
    /// A part was read back and its hash checked.
    PartVerified {
        /// Part number.
        part: u32,
    },
}

/// Receives [`TransferEvent`]s (called from transfer tasks; keep it quick).
pub type EventSink = Arc<dyn Fn(&TransferEvent) + Send + Sync>;

/// How a transfer runs.
#[derive(Clone, Default)]
pub struct TransferOptions {
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Cancels the transfer (an unfinished upload stays resumable).
    pub cancel: CancellationToken,
    /// Optional event receiver.
    pub events: Option<EventSink>,
}

impl std::fmt::Debug for TransferOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferOptions")
            .field("progress", &self.progress)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

impl TransferOptions {
    fn emit(&self, e: TransferEvent) {
        if let Some(sink) = &self.events {
            sink(&e);
        }
    }
}

/// What to record with a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    /// Pod id or host writing it; an interrupted upload is resumed only by the same writer.
    pub writer: String,
    /// Free-form metadata stored in the manifest.
    pub meta: BTreeMap<String, String>,
    /// Transfer behaviour.
    pub transfer: TransferOptions,
}

/// What a checkpoint did.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointOutcome {
    /// The manifest written.
    pub manifest: Manifest,
    /// Parts sent.
    pub parts_uploaded: u32,
    /// Parts kept from an interrupted upload of the same writer.
    pub parts_skipped: u32,
    /// Bytes sent.
    pub bytes_uploaded: u64,
    /// True when an interrupted upload was continued.
    pub resumed_upload: bool,
    /// Generations another writer claimed first (each cost a retry with the next seq).
    pub claim_conflicts: u32,
    /// Generations of this job deleted by retention afterwards.
    pub pruned: usize,
}

/// One generation as listed (cheap: from object keys and sizes, no manifest read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Generation {
    /// Job.
    pub job: String,
    /// Generation number.
    pub seq: u64,
    /// A manifest exists: the checkpoint is complete.
    pub complete: bool,
    /// Bytes of all its objects.
    pub bytes: u64,
    /// Newest modification time of its objects.
    pub last_modified: Option<Timestamp>,
}

/// Garbage collection settings; `None` takes the store's configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct GcOptions {
    /// Complete generations kept per job.
    pub keep: Option<usize>,
    /// Unfinished generations older than this are abandoned.
    pub abandon_after: Option<Duration>,
    /// Report what would be deleted without deleting.
    pub dry_run: bool,
}

/// Why gc removed a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GcReason {
    /// A complete generation older than the newest `keep`.
    Retention,
    /// An unfinished generation older than `abandon_after`.
    Abandoned,
}

/// One generation gc removed (or would remove).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GcRemoval {
    /// Job.
    pub job: String,
    /// Generation.
    pub seq: u64,
    /// Why.
    pub reason: GcReason,
    /// Bytes freed.
    pub bytes: u64,
}

/// What gc did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Generations removed (or, dry run, to be removed).
    pub removed: Vec<GcRemoval>,
    /// Multipart uploads aborted.
    pub uploads_aborted: usize,
    /// True when nothing was deleted because of `dry_run`.
    pub dry_run: bool,
}

/// Where GPU jobs keep their checkpoints.
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The newest complete checkpoint of `job`, if any.
    async fn latest(&self, job: &str) -> Result<Option<Manifest>, CheckpointError>;

    /// The manifest of one generation, if it is complete.
    async fn manifest(&self, job: &str, seq: u64) -> Result<Option<Manifest>, CheckpointError>;

    /// Checks that every part the manifest names exists with the recorded size and checksum
    /// (reads every part back and hashes it: as costly as a download, without the writes).
    async fn verify(&self, manifest: &Manifest) -> Result<(), CheckpointError>;

    /// Uploads `dir` as a new generation of `job` (or finishes this writer's interrupted one),
    /// then applies retention to the job.
    async fn checkpoint(
        &self,
        job: &str,
        dir: &Path,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointOutcome, CheckpointError>;

    /// Downloads the latest checkpoint of `job` into `dir`; [`CheckpointError::NothingToResume`]
    /// when there is none.
    async fn resume(
        &self,
        job: &str,
        dir: &Path,
        opts: &TransferOptions,
    ) -> Result<Manifest, CheckpointError>;

    /// Downloads one checkpoint into `dir`: every part verified, the files written to a staging
    /// directory inside `dir` and moved into place only when all of them check out (files of
    /// `dir` that the checkpoint does not hold are left alone).
    async fn restore(
        &self,
        manifest: &Manifest,
        dir: &Path,
        opts: &TransferOptions,
    ) -> Result<(), CheckpointError>;

    /// Generations of `job` (or of every job), by job then seq.
    async fn list(&self, job: Option<&str>) -> Result<Vec<Generation>, CheckpointError>;

    /// Deletes complete generations beyond the newest `keep` per job, and unfinished ones (with
    /// their uploads) older than `abandon_after`, for `job` or every job.
    async fn gc(&self, job: Option<&str>, opts: &GcOptions) -> Result<GcReport, CheckpointError>;
}
