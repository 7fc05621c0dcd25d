//! [`S3Store`]: the checkpoint store on S3 or an S3-compatible server (MinIO), through
//! `aws-sdk-s3` with path-style addressing, rustls (ring) and credentials from the configuration
//! or the standard AWS chain. Every S3 call runs in a `checkpoint.s3` span.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::meta::region::ProvideRegion;
use aws_config::provider_config::ProviderConfig;
use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::BeforeSerializationInterceptorContextRef;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, ProvideCredentials, Region,
    RequestChecksumCalculation, ResponseChecksumValidation, SharedCredentialsProvider,
};
use aws_sdk_s3::error::{BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use base64::Engine;
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn, Instrument};

use super::error::{classify, Call};
use super::format::{
    chunk_layout, chunk_size_for, data_name, validate_job, Chunk, Claim, KeyKind, Layout, Manifest,
    FORMAT_VERSION,
};
use super::local::{self, Snapshot, StreamReader, StreamWriter};
use super::progress::Progress;
use super::{
    CheckpointError, CheckpointOptions, CheckpointOutcome, CheckpointStore, GcOptions, GcReason,
    GcRemoval, GcReport, Generation, TransferEvent, TransferOptions,
};
use crate::clock::{Clock, SystemClock};
use crate::config::CheckpointConfig;
use crate::model::Timestamp;

/// Attempts per S3 call (the SDK's standard retry: exponential backoff with jitter); four ride
/// out a server restart or a short throttling burst without stalling a drain for long.
const MAX_ATTEMPTS: u32 = 4;
/// A store that does not accept a connection within this is down or misconfigured; waiting
/// longer only delays the error (LAN or in-cluster MinIO answers in milliseconds).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Racing writers each take the next seq after losing one; this many losses in a row means
/// something else is wrong (e.g. a server answering every conditional write with 412).
const MAX_CLAIM_ATTEMPTS: u32 = 16;
/// Whole checkpoint attempts: a lost race or an unusable continued upload costs a fresh
/// generation; three make a repeated loss vanishingly unlikely while bounding the work.
const MAX_CHECKPOINT_ATTEMPTS: u32 = 3;
/// Chunks the reader may have ready beyond those being uploaded: one keeps the network busy
/// while the next is read and hashed, without holding more parts in memory.
const READ_AHEAD: usize = 1;
/// Downloaded parts queued for the file writer: enough to absorb a slow write without holding
/// much more than the parts in flight.
const WRITE_AHEAD: usize = 2;
/// Keys per `ListObjectsV2` page (S3's maximum).
const LIST_PAGE: i32 = 1000;

/// The checkpoint store on S3 or an S3-compatible server. Clones share the client.
#[derive(Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    layout: Layout,
    endpoint: String,
    part_size: u64,
    parallelism: usize,
    keep: usize,
    abandon_after: Duration,
    clock: Arc<dyn Clock>,
    conditional: tokio::sync::OnceCell<bool>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location())
            .field("endpoint", &self.endpoint)
            .field("part_size", &self.part_size)
            .field("parallelism", &self.parallelism)
            .field("keep", &self.keep)
            .finish()
    }
}

/// Signs an upload with the SHA-256 we already computed (`x-amz-content-sha256`) instead of
/// letting the SDK hash the body again: the server checks the body against it either way.
#[derive(Debug)]
struct SignedPayload(String);

impl Intercept for SignedPayload {
    fn name(&self) -> &'static str {
        "SignedPayload"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

/// A spawned task aborted when its handle is dropped (a failed or cancelled transfer stops its
/// other parts), yielding its result or a join error.
struct AbortOnDrop<T>(tokio::task::JoinHandle<Result<T, CheckpointError>>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, CheckpointError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(join_error).and_then(|r| r))
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A part of an interrupted upload, as the store lists it.
#[derive(Debug, Clone)]
struct ListedPart {
    size: u64,
    e_tag: Option<String>,
    sha256_b64: Option<String>,
}

/// One part once handled.
struct PartDone {
    part: u32,
    sha256_hex: String,
    sha256_b64: String,
    e_tag: Option<String>,
    skipped: bool,
    /// Kept on the strength of its size alone (the server reported no checksum): read back
    /// once the object is complete.
    needs_readback: bool,
    bytes: u64,
}

/// The objects of one generation.
#[derive(Debug, Clone, Default)]
struct GenObjects {
    claim: bool,
    manifest: bool,
    /// (token, size) of data objects.
    data: Vec<(String, u64)>,
    keys: Vec<String>,
    bytes: u64,
    last_modified: Option<Timestamp>,
}

/// A generation this writer holds (claimed now, or claimed by an earlier run it continues).
struct Held {
    claim: Claim,
    /// Parts already in the store, when continuing an upload.
    listed: HashMap<u32, ListedPart>,
    /// The data object is already complete (a run that died between completing and the
    /// manifest).
    completed: bool,
    resumed: bool,
}

fn sha256_hex_b64(data: &[u8]) -> (String, String) {
    let digest = Sha256::digest(data);
    (
        hex::encode(digest),
        base64::engine::general_purpose::STANDARD.encode(digest),
    )
}

fn b64_to_hex(b64: &str) -> Option<String> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .map(hex::encode)
}

fn timestamp(dt: Option<&aws_sdk_s3::primitives::DateTime>) -> Option<Timestamp> {
    dt.and_then(|d| d.to_millis().ok())
        .and_then(|ms| u64::try_from(ms).ok())
        .map(Timestamp::from_millis)
}

fn new_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn join_error(e: tokio::task::JoinError) -> CheckpointError {
    CheckpointError::Local {
        path: std::path::PathBuf::from("."),
        problem: format!("a transfer task failed: {e}"),
    }
}

impl S3Store {
    /// A store as configured: validates the settings, picks endpoint (`checkpoint.endpoint`,
    /// else `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`, else AWS), region and credentials
    /// (`checkpoint.access_key_id`/`secret_access_key`, else the standard AWS chain), and
    /// resolves the credentials once so that a missing one is reported now.
    pub async fn connect(cfg: &CheckpointConfig) -> Result<S3Store, CheckpointError> {
        cfg.validate()
            .map_err(|e| CheckpointError::InvalidSettings(e.to_string()))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let region = match &cfg.region {
            Some(r) => Region::new(r.clone()),
            None => default_region().await,
        };
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| env_var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env_var("AWS_ENDPOINT_URL"));
        let credentials = match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(id), Some(secret)) => SharedCredentialsProvider::new(Credentials::new(
                id.clone(),
                secret.expose().to_owned(),
                None,
                None,
                "checkpoint-config",
            )),
            _ => SharedCredentialsProvider::new(
                DefaultCredentialsChain::builder()
                    .region(region.clone())
                    .configure(
                        ProviderConfig::without_region()
                            .with_http_client(http.clone())
                            .with_region(Some(region.clone())),
                    )
                    .build()
                    .await,
            ),
        };
        credentials
            .provide_credentials()
            .await
            .map_err(|e| CheckpointError::NoCredentials {
                detail: DisplayErrorContext(&e).to_string(),
            })?;
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(region.clone())
            .credentials_provider(credentials)
            .http_client(http)
            .force_path_style(cfg.path_style)
            // Our own SHA-256 per part is sent and checked; no extra CRC32 on every request,
            // and none expected back on (ranged) reads.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .build(),
            );
        if let Some(e) = &endpoint {
            builder = builder.endpoint_url(e.clone());
        }
        let shown_endpoint = endpoint.unwrap_or_else(|| format!("AWS S3 ({region})"));
        Ok(S3Store {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: cfg.bucket.clone(),
            layout: Layout::new(&cfg.prefix),
            endpoint: shown_endpoint,
            part_size: cfg.part_size,
            parallelism: cfg.parallelism,
            keep: cfg.keep,
            abandon_after: cfg.abandon_after,
            clock: Arc::new(SystemClock),
            conditional: tokio::sync::OnceCell::new(),
        })
    }

    /// The same store reading time from `clock` (manifest times, gc ages).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> S3Store {
        self.clock = clock;
        self
    }

    /// `s3://bucket/prefix`.
    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.layout.base())
    }

    /// Checks that the bucket exists and the credentials are accepted (one `HeadBucket`).
    pub async fn check(&self) -> Result<(), CheckpointError> {
        let r = self
            .call(
                "HeadBucket",
                &self.bucket,
                self.client.head_bucket().bucket(&self.bucket).send(),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            // HEAD answers carry no error code: a 404 here is the bucket.
            Err(CheckpointError::MissingObject { .. }) => Err(CheckpointError::NoSuchBucket {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Whether the server honours `If-None-Match: *` on PutObject (a second create of one key
    /// is refused with 412), probed once with a scratch object under `<prefix>/.probe/`.
    /// Without it, claims and manifests are plain writes: see the README for what remains.
    pub async fn conditional_create_supported(&self) -> Result<bool, CheckpointError> {
        self.conditional
            .get_or_try_init(|| async {
                let key = format!("{}.probe/{}", self.layout.base(), new_token());
                let first = self.put_if_absent(&key, Bytes::from_static(b"1")).await?;
                let second = self.put_if_absent(&key, Bytes::from_static(b"2")).await?;
                self.delete(&key).await?;
                let supported = first && !second;
                if !supported {
                    warn!(
                        endpoint = %self.endpoint,
                        "the checkpoint store ignores If-None-Match: racing writers are detected \
                         only after the fact"
                    );
                }
                Ok(supported)
            })
            .await
            .copied()
    }

    /// Runs one S3 call in a span, turning its error into a [`CheckpointError`].
    async fn call<T, E, F>(&self, op: &'static str, key: &str, fut: F) -> Result<T, CheckpointError>
    where
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let span = tracing::debug_span!("checkpoint.s3", op, bucket = %self.bucket, key);
        async {
            let started = Instant::now();
            let result = fut.await;
            let ms = started.elapsed().as_millis() as u64;
            match &result {
                Ok(_) => debug!(ms, "ok"),
                Err(e) => debug!(ms, error = %DisplayErrorContext(e), "failed"),
            }
            result.map_err(|e| {
                classify(
                    e,
                    &Call {
                        op,
                        bucket: &self.bucket,
                        key,
                        endpoint: &self.endpoint,
                    },
                )
            })
        }
        .instrument(span)
        .await
    }

    /// Creates `key` only if it does not exist: true when created, false when it existed.
    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<bool, CheckpointError> {
        let (hex, b64) = sha256_hex_b64(&body);
        let r = self
            .call(
                "PutObject",
                key,
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .if_none_match("*")
                    .content_type("application/json")
                    .checksum_sha256(b64)
                    .body(ByteStream::from(body))
                    .customize()
                    .interceptor(SignedPayload(hex))
                    .send(),
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            // 412: it exists. 409: a concurrent conditional write to the same key is in flight.
            Err(e) if matches!(e.status(), Some(412 | 409)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, CheckpointError> {
        let r = self
            .call(
                "GetObject",
                key,
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send(),
            )
            .await;
        let out = match r {
            Ok(o) => o,
            Err(CheckpointError::MissingObject { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| CheckpointError::Transient {
                op: "GetObject",
                code: "body".into(),
                message: e.to_string(),
            })?;
        Ok(Some(body.into_bytes()))
    }

    async fn get_claim(&self, job: &str, seq: u64) -> Result<Option<Claim>, CheckpointError> {
        let key = self.layout.claim(job, seq);
        let Some(bytes) = self.get_bytes(&key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CheckpointError::BadManifest {
                job: job.to_owned(),
                seq,
                problem: format!("its claim {key} is not readable: {e}"),
            })
    }

    async fn delete(&self, key: &str) -> Result<(), CheckpointError> {
        self.call(
            "DeleteObject",
            key,
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send(),
        )
        .await
        .map(|_| ())
    }

    /// Every generation under `job` (or every job), by (job, seq).
    async fn scan(
        &self,
        job: Option<&str>,
    ) -> Result<BTreeMap<(String, u64), GenObjects>, CheckpointError> {
        let prefix = match job {
            Some(j) => self.layout.job_prefix(j),
            None => self.layout.base().to_owned(),
        };
        let mut gens: BTreeMap<(String, u64), GenObjects> = BTreeMap::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call(
                    "ListObjectsV2",
                    &prefix,
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(&prefix)
                        .max_keys(LIST_PAGE)
                        .set_continuation_token(token.clone())
                        .send(),
                )
                .await?;
            for obj in page.contents() {
                let Some(key) = obj.key() else { continue };
                let Some((j, seq, kind)) = self.layout.parse(key) else {
                    continue;
                };
                let size = obj.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0);
                let g = gens.entry((j, seq)).or_default();
                match kind {
                    KeyKind::Claim => g.claim = true,
                    KeyKind::Manifest => g.manifest = true,
                    KeyKind::Data(t) => g.data.push((t, size)),
                    KeyKind::Other => {}
                }
                g.keys.push(key.to_owned());
                g.bytes += size;
                let lm = timestamp(obj.last_modified());
                g.last_modified = g.last_modified.max(lm);
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(gens)
    }

    async fn scan_job(&self, job: &str) -> Result<BTreeMap<u64, GenObjects>, CheckpointError> {
        Ok(self
            .scan(Some(job))
            .await?
            .into_iter()
            .map(|((_, seq), g)| (seq, g))
            .collect())
    }

    async fn read_manifest(
        &self,
        job: &str,
        seq: u64,
    ) -> Result<Option<Manifest>, CheckpointError> {
        let key = self.layout.manifest(job, seq);
        let Some(bytes) = self.get_bytes(&key).await? else {
            return Ok(None);
        };
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| CheckpointError::BadManifest {
                job: job.to_owned(),
                seq,
                problem: format!("{key} is not a manifest: {e}"),
            })?;
        if m.job != job || m.seq != seq {
            return Err(CheckpointError::BadManifest {
                job: job.to_owned(),
                seq,
                problem: format!("{key} describes job {:?} generation {}", m.job, m.seq),
            });
        }
        m.check()?;
        Ok(Some(m))
    }

    /// Parts of an unfinished upload, by number.
    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<HashMap<u32, ListedPart>, CheckpointError> {
        let mut parts = HashMap::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .call(
                    "ListParts",
                    key,
                    self.client
                        .list_parts()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .set_part_number_marker(marker.clone())
                        .send(),
                )
                .await?;
            for p in page.parts() {
                let (Some(n), Some(size)) = (p.part_number(), p.size()) else {
                    continue;
                };
                let (Ok(n), Ok(size)) = (u32::try_from(n), u64::try_from(size)) else {
                    continue;
                };
                parts.insert(
                    n,
                    ListedPart {
                        size,
                        e_tag: p.e_tag().map(str::to_owned),
                        sha256_b64: p.checksum_sha256().map(str::to_owned),
                    },
                );
            }
            match page.next_part_number_marker() {
                Some(m) if page.is_truncated() == Some(true) => marker = Some(m.to_owned()),
                _ => break,
            }
        }
        Ok(parts)
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), CheckpointError> {
        self.call(
            "AbortMultipartUpload",
            key,
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send(),
        )
        .await
        .map(|_| ())
    }

    /// This writer's unfinished generation of `job` to continue: the job's highest generation,
    /// without a manifest, claimed by `writer` with the same chunk size, whose upload (or
    /// completed data object) is still there.
    async fn continuable(
        &self,
        job: &str,
        writer: &str,
        chunk_size: u64,
        total: u64,
        gens: &BTreeMap<u64, GenObjects>,
    ) -> Result<Option<Held>, CheckpointError> {
        let Some((&seq, g)) = gens.iter().next_back() else {
            return Ok(None);
        };
        if g.manifest || !g.claim {
            return Ok(None);
        }
        let Some(claim) = self.get_claim(job, seq).await? else {
            return Ok(None);
        };
        if claim.writer != writer
            || claim.chunk_size != chunk_size
            || claim.upload_id.is_some() != (total > 0)
        {
            return Ok(None);
        }
        let completed = g
            .data
            .iter()
            .any(|(t, size)| *t == claim.token && *size == total);
        let listed = match (&claim.upload_id, completed) {
            (Some(id), false) => {
                let key = self.layout.data(job, seq, &claim.token);
                match self.list_parts(&key, id).await {
                    Ok(p) => p,
                    Err(e) if e.code() == Some("NoSuchUpload") => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
            _ => HashMap::new(),
        };
        info!(
            job,
            seq,
            parts = listed.len(),
            completed,
            "continuing this writer's unfinished checkpoint"
        );
        Ok(Some(Held {
            claim,
            listed,
            completed,
            resumed: true,
        }))
    }

    /// Claims the next free generation of `job`: creates its upload, then its claim with
    /// `If-None-Match: *`; a writer that loses the race takes the next seq.
    async fn claim_new(
        &self,
        job: &str,
        writer: &str,
        chunk_size: u64,
        total: u64,
        mut next_seq: u64,
        conflicts: &mut u32,
    ) -> Result<Held, CheckpointError> {
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let seq = next_seq;
            let token = new_token();
            let data_key = self.layout.data(job, seq, &token);
            let upload_id = if total > 0 {
                let out = self
                    .call(
                        "CreateMultipartUpload",
                        &data_key,
                        self.client
                            .create_multipart_upload()
                            .bucket(&self.bucket)
                            .key(&data_key)
                            .content_type("application/octet-stream")
                            .checksum_algorithm(ChecksumAlgorithm::Sha256)
                            .send(),
                    )
                    .await?;
                Some(out.upload_id().unwrap_or_default().to_owned())
            } else {
                None
            };
            let claim = Claim {
                format: FORMAT_VERSION,
                job: job.to_owned(),
                seq,
                writer: writer.to_owned(),
                token,
                upload_id,
                chunk_size,
                created: self.clock.now(),
            };
            let body = serde_json::to_vec(&claim).map_err(|e| {
                CheckpointError::InvalidSettings(format!("claim not serializable: {e}"))
            })?;
            let created = self
                .put_if_absent(&self.layout.claim(job, seq), Bytes::from(body))
                .await;
            // Read back: a server whose conditional create is not atomic with the write (s3s-fs
            // checks, then renames) can let two racing creates both "succeed"; the claim holds
            // the last one.
            let won = match created {
                Ok(true) => self
                    .get_claim(job, seq)
                    .await?
                    .is_some_and(|c| c.token == claim.token),
                Ok(false) => false,
                Err(e) => {
                    if let Some(id) = &claim.upload_id {
                        let _ = self.abort_upload(&data_key, id).await;
                    }
                    return Err(e);
                }
            };
            if won {
                debug!(job, seq, "claimed");
                return Ok(Held {
                    claim,
                    listed: HashMap::new(),
                    completed: false,
                    resumed: false,
                });
            }
            *conflicts += 1;
            info!(
                job,
                seq, "another writer claimed this generation first; taking the next"
            );
            if let Some(id) = &claim.upload_id {
                if let Err(e) = self.abort_upload(&data_key, id).await {
                    warn!(error = %e, "aborting the upload of a lost claim");
                }
            }
            let highest = self.scan_job(job).await?.keys().next_back().copied();
            next_seq = (seq + 1).max(highest.map_or(1, |h| h + 1));
        }
        Err(CheckpointError::Conflict {
            job: job.to_owned(),
            seq: next_seq,
            detail: format!("{MAX_CLAIM_ATTEMPTS} generations in a row were taken first"),
        })
    }

    /// Reads `snap` as a stream and uploads its chunks (skipping listed parts that check out),
    /// `parallelism` at a time. Returns the files' entries and every part.
    async fn upload_stream(
        &self,
        data_key: &str,
        held: &Held,
        snap: &Snapshot,
        opts: &TransferOptions,
    ) -> Result<(Vec<super::FileEntry>, Vec<PartDone>), CheckpointError> {
        let chunk_size = held.claim.chunk_size;
        let layout = chunk_layout(snap.total, chunk_size).ok_or_else(|| {
            CheckpointError::InvalidSettings(format!("chunk size {chunk_size} is unusable"))
        })?;
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<(u32, Bytes), CheckpointError>>(READ_AHEAD);
        let reader_snap = snap.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let mut r = StreamReader::new(&reader_snap);
            for (part, _, size) in layout {
                let item = r.read_chunk(size).and_then(|d| {
                    if d.len() as u64 == size {
                        Ok((part, Bytes::from(d)))
                    } else {
                        Err(CheckpointError::Local {
                            path: reader_snap
                                .files
                                .last()
                                .map(|f| f.abs.clone())
                                .unwrap_or_default(),
                            problem: "the directory shrank while it was being checkpointed".into(),
                        })
                    }
                });
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    // The uploads stopped (error or cancel), or we did.
                    return None;
                }
            }
            Some(r.finish())
        });
        let total = snap.total;
        let bar = Progress::new(opts.progress, total, "upload");
        let upload_id = held.claim.upload_id.as_deref().unwrap_or_default();
        let mut uploads = ReceiverStream::new(rx)
            .map(|item| {
                let bar = &bar;
                async move {
                    let (part, bytes) = item?;
                    let len = bytes.len() as u64;
                    let (bytes, (hex, b64)) = tokio::task::spawn_blocking(move || {
                        let h = sha256_hex_b64(&bytes);
                        (bytes, h)
                    })
                    .await
                    .map_err(join_error)?;
                    if let Some(listed) = held.listed.get(&part) {
                        let same = listed.size == len
                            && listed.sha256_b64.as_ref().is_none_or(|c| *c == b64);
                        if same {
                            opts.emit(TransferEvent::PartSkipped { part });
                            bar.inc(len);
                            return Ok(PartDone {
                                part,
                                sha256_hex: hex,
                                sha256_b64: b64,
                                e_tag: listed.e_tag.clone(),
                                skipped: true,
                                needs_readback: listed.sha256_b64.is_none(),
                                bytes: len,
                            });
                        }
                    }
                    if held.completed {
                        // The object is complete: nothing to send; everything is read back.
                        bar.inc(len);
                        return Ok(PartDone {
                            part,
                            sha256_hex: hex,
                            sha256_b64: b64,
                            e_tag: None,
                            skipped: true,
                            needs_readback: true,
                            bytes: len,
                        });
                    }
                    let out = self
                        .call(
                            "UploadPart",
                            data_key,
                            self.client
                                .upload_part()
                                .bucket(&self.bucket)
                                .key(data_key)
                                .upload_id(upload_id)
                                .part_number(i32::try_from(part).unwrap_or(i32::MAX))
                                .content_length(i64::try_from(len).unwrap_or(i64::MAX))
                                .checksum_sha256(b64.clone())
                                .body(ByteStream::from(bytes))
                                .customize()
                                .interceptor(SignedPayload(hex.clone()))
                                .send(),
                        )
                        .await?;
                    if let Some(returned) = out.checksum_sha256() {
                        if returned != b64 {
                            return Err(CheckpointError::CorruptPart {
                                key: data_key.to_owned(),
                                part,
                                expected: hex,
                                actual: b64_to_hex(returned).unwrap_or_else(|| returned.to_owned()),
                            });
                        }
                    }
                    opts.emit(TransferEvent::PartUploaded { part, bytes: len });
                    bar.inc(len);
                    Ok(PartDone {
                        part,
                        sha256_hex: hex,
                        sha256_b64: b64,
                        e_tag: out.e_tag().map(str::to_owned),
                        skipped: false,
                        needs_readback: false,
                        bytes: len,
                    })
                }
            })
            .buffer_unordered(self.parallelism);
        let mut done = Vec::new();
        loop {
            tokio::select! {
                biased;
                _ = opts.cancel.cancelled() => return Err(CheckpointError::Cancelled),
                next = uploads.next() => match next {
                    None => break,
                    Some(Ok(d)) => done.push(d),
                    Some(Err(e)) => return Err(e),
                },
            }
        }
        drop(uploads);
        let files = match reader.await.map_err(join_error)? {
            Some(r) => r?,
            None => {
                return Err(CheckpointError::Local {
                    path: std::path::PathBuf::from("."),
                    problem: "the directory reader stopped early".into(),
                })
            }
        };
        done.sort_by_key(|d| d.part);
        Ok((files, done))
    }

    /// One chunk of `key`, read with a ranged GET and checked against its hash.
    async fn fetch_chunk(&self, key: &str, c: &Chunk) -> Result<Vec<Bytes>, CheckpointError> {
        let range = format!("bytes={}-{}", c.offset, c.offset + c.size - 1);
        let mut out = self
            .call(
                "GetObject",
                key,
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .range(range)
                    .send(),
            )
            .await?;
        // Hashed as it arrives, kept as the segments it came in (no copy into one buffer).
        let mut hasher = Sha256::new();
        let mut segments = Vec::new();
        let mut got = 0u64;
        while let Some(seg) = out.body.next().await {
            let seg = seg.map_err(|e| CheckpointError::Transient {
                op: "GetObject",
                code: "body".into(),
                message: e.to_string(),
            })?;
            hasher.update(&seg);
            got += seg.len() as u64;
            segments.push(seg);
        }
        if got != c.size {
            return Err(CheckpointError::MissingObject {
                key: key.to_owned(),
                detail: format!("part {} came back with {got} of {} bytes", c.part, c.size),
            });
        }
        let actual = hex::encode(hasher.finalize());
        if actual != c.sha256 {
            return Err(CheckpointError::CorruptPart {
                key: key.to_owned(),
                part: c.part,
                expected: c.sha256.clone(),
                actual,
            });
        }
        Ok(segments)
    }

    /// The data object exists with the manifest's size.
    async fn check_data_size(&self, key: &str, total: u64) -> Result<(), CheckpointError> {
        let head = self
            .call(
                "HeadObject",
                key,
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send(),
            )
            .await?;
        let size = head.content_length().and_then(|s| u64::try_from(s).ok());
        if size != Some(total) {
            return Err(CheckpointError::MissingObject {
                key: key.to_owned(),
                detail: format!("{size:?} bytes, the manifest says {total}"),
            });
        }
        Ok(())
    }

    /// Reads back `chunks` of `key` and checks their hashes, `parallelism` at a time.
    async fn read_back(
        &self,
        key: &str,
        chunks: &[Chunk],
        opts: &TransferOptions,
        bar: &Progress,
    ) -> Result<(), CheckpointError> {
        // Owned chunks: a closure over borrowed items trips the `Send` check of async_trait.
        let mut checks = stream::iter(chunks.to_vec())
            .map(|c| async move {
                self.fetch_chunk(key, &c).await?;
                opts.emit(TransferEvent::PartVerified { part: c.part });
                bar.inc(c.size);
                Ok::<(), CheckpointError>(())
            })
            .buffer_unordered(self.parallelism);
        loop {
            tokio::select! {
                biased;
                _ = opts.cancel.cancelled() => return Err(CheckpointError::Cancelled),
                next = checks.next() => match next {
                    None => return Ok(()),
                    Some(r) => r?,
                },
            }
        }
    }

    /// One attempt at a checkpoint: continue or claim a generation, upload, verify, write the
    /// manifest. `allow_continue` false forces a new generation.
    async fn try_checkpoint(
        &self,
        job: &str,
        dir: &Path,
        opts: &CheckpointOptions,
        allow_continue: bool,
    ) -> Result<CheckpointOutcome, CheckpointError> {
        let root = dir.to_owned();
        let snap = tokio::task::spawn_blocking(move || local::scan(&root))
            .await
            .map_err(join_error)??;
        let chunk_size = chunk_size_for(snap.total, self.part_size);
        let writer = opts.writer.as_str();
        let gens = self.scan_job(job).await?;
        let mut conflicts = 0;
        let held = match allow_continue {
            true => {
                self.continuable(job, writer, chunk_size, snap.total, &gens)
                    .await?
            }
            false => None,
        };
        let held = match held {
            Some(h) => h,
            None => {
                let next = gens.keys().next_back().map_or(1, |s| s + 1);
                self.claim_new(job, writer, chunk_size, snap.total, next, &mut conflicts)
                    .await?
            }
        };
        let seq = held.claim.seq;
        let token = held.claim.token.clone();
        let data_key = self.layout.data(job, seq, &token);
        let span = tracing::info_span!("checkpoint", job, seq, bytes = snap.total);
        async {
            let (files, parts) = self
                .upload_stream(&data_key, &held, &snap, &opts.transfer)
                .await?;
            let layout = chunk_layout(snap.total, chunk_size).unwrap_or_default();
            if layout.len() != parts.len() {
                return Err(CheckpointError::Local {
                    path: dir.to_owned(),
                    problem: format!(
                        "{} of {} parts were read; the directory shrank while it was being \
                         checkpointed",
                        parts.len(),
                        layout.len()
                    ),
                });
            }
            let chunks: Vec<Chunk> = layout
                .into_iter()
                .zip(&parts)
                .map(|((part, offset, size), d)| Chunk {
                    part,
                    offset,
                    size,
                    sha256: d.sha256_hex.clone(),
                })
                .collect();
            if snap.total > 0 && !held.completed {
                let completed: Vec<CompletedPart> = parts
                    .iter()
                    .map(|d| {
                        CompletedPart::builder()
                            .part_number(i32::try_from(d.part).unwrap_or(i32::MAX))
                            .set_e_tag(d.e_tag.clone())
                            .checksum_sha256(d.sha256_b64.clone())
                            .build()
                    })
                    .collect();
                self.call(
                    "CompleteMultipartUpload",
                    &data_key,
                    self.client
                        .complete_multipart_upload()
                        .bucket(&self.bucket)
                        .key(&data_key)
                        .upload_id(held.claim.upload_id.as_deref().unwrap_or_default())
                        .multipart_upload(
                            CompletedMultipartUpload::builder()
                                .set_parts(Some(completed))
                                .build(),
                        )
                        .send(),
                )
                .await?;
            }
            if snap.total > 0 {
                self.check_data_size(&data_key, snap.total).await?;
                let unproven: Vec<Chunk> = chunks
                    .iter()
                    .zip(&parts)
                    .filter(|(_, d)| d.needs_readback)
                    .map(|(c, _)| c.clone())
                    .collect();
                if !unproven.is_empty() {
                    debug!(
                        parts = unproven.len(),
                        "reading back parts kept on their size alone"
                    );
                    let bar = Progress::new(opts.transfer.progress, 0, "verify");
                    let checked = self
                        .read_back(&data_key, &unproven, &opts.transfer, &bar)
                        .await;
                    if let Err(e) = checked {
                        if matches!(e, CheckpointError::CorruptPart { .. }) {
                            // Kept parts held other bytes (the directory changed since the
                            // interrupted run): this generation is ours and worthless.
                            let gens = self.scan_job(job).await?;
                            if let Some(g) = gens.get(&seq) {
                                self.delete_generation(job, seq, g).await?;
                            }
                        }
                        return Err(e);
                    }
                }
            }
            // Still ours? (A generation is only collected once abandoned, but a writer that
            // stalled that long must not commit over a reused seq.)
            match self.get_claim(job, seq).await? {
                Some(c) if c.token == token => {}
                _ => {
                    // Our data object is ours alone (named by our token): remove it.
                    if snap.total > 0 {
                        if let Err(e) = self.delete(&data_key).await {
                            warn!(error = %e, "removing the data of a lost generation");
                        }
                    }
                    return Err(CheckpointError::Conflict {
                        job: job.to_owned(),
                        seq,
                        detail: "its claim was replaced or collected while uploading".into(),
                    });
                }
            }
            let manifest = Manifest {
                format: FORMAT_VERSION,
                job: job.to_owned(),
                seq,
                created: held.claim.created,
                writer: writer.to_owned(),
                files,
                dirs: snap.dirs.clone(),
                meta: opts.meta.clone(),
                data: (snap.total > 0).then(|| data_name(&token)),
                token: token.clone(),
                total_size: snap.total,
                chunk_size,
                chunks,
            };
            manifest.check()?;
            let body = serde_json::to_vec_pretty(&manifest).map_err(|e| {
                CheckpointError::InvalidSettings(format!("manifest not serializable: {e}"))
            })?;
            let key = self.layout.manifest(job, seq);
            if !self.put_if_absent(&key, Bytes::from(body)).await? {
                return Err(CheckpointError::Conflict {
                    job: job.to_owned(),
                    seq,
                    detail: "a manifest already exists for it".into(),
                });
            }
            // Read back: without an atomic conditional create a racing writer may have
            // replaced ours (the store warns once when the server ignores If-None-Match).
            self.conditional_create_supported().await?;
            let back = self.read_manifest(job, seq).await?;
            if back.as_ref().map(|m| m.token.as_str()) != Some(token.as_str()) {
                return Err(CheckpointError::Conflict {
                    job: job.to_owned(),
                    seq,
                    detail: "another writer's manifest replaced ours".into(),
                });
            }
            let uploaded = parts.iter().filter(|d| !d.skipped).count();
            let outcome = CheckpointOutcome {
                parts_uploaded: u32::try_from(uploaded).unwrap_or(u32::MAX),
                parts_skipped: u32::try_from(parts.len() - uploaded).unwrap_or(u32::MAX),
                bytes_uploaded: parts.iter().filter(|d| !d.skipped).map(|d| d.bytes).sum(),
                resumed_upload: held.resumed,
                claim_conflicts: conflicts,
                pruned: 0,
                manifest,
            };
            info!(
                files = outcome.manifest.files.len(),
                uploaded = outcome.parts_uploaded,
                skipped = outcome.parts_skipped,
                "checkpoint complete"
            );
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    /// Deletes one generation: manifest first (it stops being complete at once), then its
    /// upload and data, the claim last (the seq stays taken until the rest is gone).
    async fn delete_generation(
        &self,
        job: &str,
        seq: u64,
        g: &GenObjects,
    ) -> Result<usize, CheckpointError> {
        let mut aborted = 0;
        if g.manifest {
            self.delete(&self.layout.manifest(job, seq)).await?;
        }
        if g.claim {
            if let Some(claim) = self.get_claim(job, seq).await.ok().flatten() {
                let data_done = g.data.iter().any(|(t, _)| *t == claim.token);
                if let (Some(id), false) = (&claim.upload_id, data_done) {
                    let key = self.layout.data(job, seq, &claim.token);
                    match self.abort_upload(&key, id).await {
                        Ok(()) => aborted += 1,
                        Err(e) => debug!(error = %e, "upload already gone"),
                    }
                }
            }
        }
        let claim_key = self.layout.claim(job, seq);
        let manifest_key = self.layout.manifest(job, seq);
        for key in g
            .keys
            .iter()
            .filter(|k| **k != claim_key && **k != manifest_key)
        {
            self.delete(key).await?;
        }
        if g.claim {
            self.delete(&claim_key).await?;
        }
        Ok(aborted)
    }

    /// Multipart uploads under the prefix started before `cutoff` (S3 and MinIO list them;
    /// servers that do not are skipped, their uploads being found through claims instead).
    async fn abort_stale_uploads(
        &self,
        prefix: &str,
        cutoff: Timestamp,
        dry_run: bool,
    ) -> Result<usize, CheckpointError> {
        let mut aborted = 0;
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = match self
                .call(
                    "ListMultipartUploads",
                    prefix,
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.bucket)
                        .prefix(prefix)
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send(),
                )
                .await
            {
                Ok(p) => p,
                Err(e) if e.code() == Some("NotImplemented") || e.status() == Some(501) => {
                    debug!("the store does not list multipart uploads");
                    return Ok(0);
                }
                Err(e) => return Err(e),
            };
            for u in page.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                if timestamp(u.initiated()).is_some_and(|t| t < cutoff) {
                    if !dry_run {
                        self.abort_upload(key, id).await?;
                    }
                    aborted += 1;
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(aborted)
    }
}

async fn default_region() -> Region {
    // Environment, then the profile file; never the instance metadata service (a network
    // call); MinIO accepts any region.
    if let Some(r) = env_var("AWS_REGION").or_else(|| env_var("AWS_DEFAULT_REGION")) {
        return Region::new(r);
    }
    let profile = aws_config::profile::ProfileFileRegionProvider::new();
    match profile.region().await {
        Some(r) => r,
        None => Region::new("us-east-1"),
    }
}

#[async_trait]
impl CheckpointStore for S3Store {
    async fn latest(&self, job: &str) -> Result<Option<Manifest>, CheckpointError> {
        validate_job(job)?;
        let gens = self.scan_job(job).await?;
        for (&seq, g) in gens.iter().rev() {
            if g.manifest {
                if let Some(m) = self.read_manifest(job, seq).await? {
                    return Ok(Some(m));
                }
            }
        }
        Ok(None)
    }

    async fn manifest(&self, job: &str, seq: u64) -> Result<Option<Manifest>, CheckpointError> {
        validate_job(job)?;
        self.read_manifest(job, seq).await
    }

    async fn verify(&self, manifest: &Manifest) -> Result<(), CheckpointError> {
        manifest.check()?;
        let span =
            tracing::info_span!("checkpoint.verify", job = %manifest.job, seq = manifest.seq);
        async {
            let Some(data) = &manifest.data else {
                return Ok(());
            };
            let key = format!(
                "{}{data}",
                self.layout.generation(&manifest.job, manifest.seq)
            );
            self.check_data_size(&key, manifest.total_size).await?;
            let bar = Progress::new(false, 0, "verify");
            self.read_back(&key, &manifest.chunks, &TransferOptions::default(), &bar)
                .await
        }
        .instrument(span)
        .await
    }

    async fn checkpoint(
        &self,
        job: &str,
        dir: &Path,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointOutcome, CheckpointError> {
        validate_job(job)?;
        if opts.writer.trim().is_empty() {
            return Err(CheckpointError::InvalidSettings(
                "the writer (pod id or host) is empty".into(),
            ));
        }
        let mut allow_continue = true;
        let mut attempt = 1;
        let mut outcome = loop {
            let err = match self.try_checkpoint(job, dir, opts, allow_continue).await {
                Ok(o) => break o,
                Err(e) => e,
            };
            // Worth a fresh generation: a race lost to another writer, or a continued upload
            // that turned out unusable (aborted meanwhile, or kept parts holding other bytes
            // than the directory now does).
            let fresh_helps = match &err {
                CheckpointError::Conflict { .. } => true,
                CheckpointError::CorruptPart { .. } | CheckpointError::Auth { .. } => {
                    allow_continue
                }
                e => allow_continue && e.code() == Some("NoSuchUpload"),
            };
            if !fresh_helps
                || attempt >= MAX_CHECKPOINT_ATTEMPTS
                || opts.transfer.cancel.is_cancelled()
            {
                return Err(err);
            }
            warn!(error = %err, attempt, "checkpoint attempt failed; writing a new generation");
            allow_continue = false;
            attempt += 1;
        };
        match self.gc(Some(job), &GcOptions::default()).await {
            Ok(r) => outcome.pruned = r.removed.len(),
            Err(e) => {
                warn!(error = %e, job, "retention after the checkpoint failed; `checkpoint gc` retries it")
            }
        }
        Ok(outcome)
    }

    async fn resume(
        &self,
        job: &str,
        dir: &Path,
        opts: &TransferOptions,
    ) -> Result<Manifest, CheckpointError> {
        let Some(m) = self.latest(job).await? else {
            return Err(CheckpointError::NothingToResume {
                job: job.to_owned(),
                location: self.location(),
            });
        };
        self.restore(&m, dir, opts).await?;
        Ok(m)
    }

    async fn restore(
        &self,
        manifest: &Manifest,
        dir: &Path,
        opts: &TransferOptions,
    ) -> Result<(), CheckpointError> {
        manifest.check()?;
        let span =
            tracing::info_span!("checkpoint.restore", job = %manifest.job, seq = manifest.seq);
        async {
            let key = manifest
                .data
                .as_ref()
                .map(|d| format!("{}{d}", self.layout.generation(&manifest.job, manifest.seq)));
            if let Some(k) = &key {
                self.check_data_size(k, manifest.total_size).await?;
            }
            let target = dir.to_owned();
            let staging = dir.join(format!("{}{}", local::STAGING_PREFIX, manifest.token));
            {
                let target = target.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&target)
                        .map_err(|e| CheckpointError::io("creating", &target, e))?;
                    local::remove_stale_staging(&target)
                })
                .await
                .map_err(join_error)??;
            }
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(WRITE_AHEAD);
            let writer = {
                let staging = staging.clone();
                let dirs = manifest.dirs.clone();
                let files = manifest.files.clone();
                tokio::task::spawn_blocking(move || {
                    let mut w = StreamWriter::new(&staging, &dirs, &files)?;
                    while let Some(segments) = rx.blocking_recv() {
                        for seg in segments {
                            w.write(&seg)?;
                        }
                    }
                    w.finish()
                })
            };
            let bar = Progress::new(opts.progress, manifest.total_size, "download");
            let download = async {
                let Some(key) = &key else { return Ok(()) };
                // Each part is its own task: downloads go on while the writer is busy.
                let mut gets = stream::iter(manifest.chunks.clone())
                    .map(|c| {
                        let store = self.clone();
                        let key = key.clone();
                        AbortOnDrop(tokio::spawn(async move {
                            let segments = store.fetch_chunk(&key, &c).await?;
                            Ok::<_, CheckpointError>((c, segments))
                        }))
                    })
                    .buffered(self.parallelism);
                loop {
                    tokio::select! {
                        biased;
                        _ = opts.cancel.cancelled() => return Err(CheckpointError::Cancelled),
                        next = gets.next() => match next {
                            None => return Ok(()),
                            Some(r) => {
                                let (c, segments) = r?;
                                opts.emit(TransferEvent::PartVerified { part: c.part });
                                if tx.send(segments).await.is_err() {
                                    // The writer stopped: its error says why.
                                    return Ok(());
                                }
                                bar.inc(c.size);
                            }
                        },
                    }
                }
            };
            let downloaded = download.await;
            drop(tx);
            let written = writer.await.map_err(join_error).and_then(|r| r);
            let result = downloaded.and(written);
            let commit = result.and_then(|()| {
                local::commit_staging(&staging, &target, &manifest.dirs, &manifest.files)
            });
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&staging)).await;
            commit
        }
        .instrument(span)
        .await
    }

    async fn list(&self, job: Option<&str>) -> Result<Vec<Generation>, CheckpointError> {
        if let Some(j) = job {
            validate_job(j)?;
        }
        Ok(self
            .scan(job)
            .await?
            .into_iter()
            .map(|((job, seq), g)| Generation {
                job,
                seq,
                complete: g.manifest,
                bytes: g.bytes,
                last_modified: g.last_modified,
            })
            .collect())
    }

    async fn gc(&self, job: Option<&str>, opts: &GcOptions) -> Result<GcReport, CheckpointError> {
        if let Some(j) = job {
            validate_job(j)?;
        }
        let keep = opts.keep.unwrap_or(self.keep).max(1);
        let abandon_after = opts.abandon_after.unwrap_or(self.abandon_after);
        let cutoff = self.clock.now().minus(abandon_after);
        let gens = self.scan(job).await?;
        let mut by_job: BTreeMap<&str, Vec<(u64, &GenObjects)>> = BTreeMap::new();
        for ((j, seq), g) in &gens {
            by_job.entry(j.as_str()).or_default().push((*seq, g));
        }
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        for (j, list) in by_job {
            let complete: Vec<u64> = list
                .iter()
                .filter(|(_, g)| g.manifest)
                .map(|(s, _)| *s)
                .collect();
            let kept_from = complete.len().saturating_sub(keep);
            let retired: Vec<u64> = complete[..kept_from].to_vec();
            for (seq, g) in list {
                let reason = if retired.contains(&seq) {
                    GcReason::Retention
                } else if !g.manifest && g.last_modified.is_some_and(|t| t <= cutoff) {
                    GcReason::Abandoned
                } else {
                    continue;
                };
                if !opts.dry_run {
                    report.uploads_aborted += self.delete_generation(j, seq, g).await?;
                }
                info!(job = j, seq, ?reason, dry_run = opts.dry_run, "gc");
                report.removed.push(GcRemoval {
                    job: j.to_owned(),
                    seq,
                    reason,
                    bytes: g.bytes,
                });
            }
        }
        let prefix = match job {
            Some(j) => self.layout.job_prefix(j),
            None => self.layout.base().to_owned(),
        };
        report.uploads_aborted += self
            .abort_stale_uploads(&prefix, cutoff, opts.dry_run)
            .await?;
        Ok(report)
    }
}
