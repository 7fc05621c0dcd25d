//! [`CheckpointError`]: what went wrong with a checkpoint, and what to do. The S3 SDK's errors
//! are turned into it here; nothing of the wire (or any credential) leaks past this module.

use std::path::PathBuf;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// A checkpoint store failure. Every message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The job id cannot name a checkpoint.
    #[error("invalid job id {job:?}: {problem}")]
    InvalidJob {
        /// The id as given (truncated).
        job: String,
        /// What is wrong.
        problem: String,
    },
    /// The store settings are unusable.
    #[error("invalid checkpoint settings: {0}")]
    InvalidSettings(String),
    /// No credentials were found or they could not be loaded.
    #[error(
        "no credentials for the checkpoint store ({detail}): set checkpoint.access_key_id and \
         checkpoint.secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS \
         profile or web identity)"
    )]
    NoCredentials {
        /// Why the credential chain gave up.
        detail: String,
    },
    /// The store rejected the credentials or the request's authorization.
    #[error(
        "the checkpoint store rejected our credentials ({code}: {message}): check \
         checkpoint.access_key_id and checkpoint.secret_access_key (or AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY) and the bucket's policy"
    )]
    Auth {
        /// S3 error code (`InvalidAccessKeyId`, `SignatureDoesNotMatch`, `AccessDenied`, …).
        code: String,
        /// The store's message.
        message: String,
    },
    /// The bucket does not exist.
    #[error(
        "bucket {bucket:?} does not exist at {endpoint}: create it (e.g. `aws s3 mb \
         s3://{bucket}`) or fix checkpoint.bucket / --bucket"
    )]
    NoSuchBucket {
        /// Bucket name.
        bucket: String,
        /// Where we looked.
        endpoint: String,
    },
    /// The endpoint could not be reached (connection refused, DNS, TLS, timeout).
    #[error(
        "the checkpoint store at {endpoint} is unreachable ({detail}): check checkpoint.endpoint \
         (or AWS_ENDPOINT_URL) and the network; retrying may help"
    )]
    Unreachable {
        /// Where we tried.
        endpoint: String,
        /// The transport error.
        detail: String,
    },
    /// A temporary store failure (5xx, throttling, an unreadable answer).
    #[error("the checkpoint store failed {op} ({code}: {message}); retrying may help")]
    Transient {
        /// The S3 operation.
        op: &'static str,
        /// Error code or HTTP status.
        code: String,
        /// The store's message.
        message: String,
    },
    /// Any other refusal by the store.
    #[error("{op} on {key:?} failed with {code} (HTTP {status}): {message}")]
    S3 {
        /// The S3 operation.
        op: &'static str,
        /// Object key (or bucket) it was about.
        key: String,
        /// S3 error code.
        code: String,
        /// HTTP status.
        status: u16,
        /// The store's message.
        message: String,
    },
    /// A part's bytes do not hash to what the manifest records.
    #[error(
        "part {part} of {key} is corrupt (sha256 {actual}, manifest says {expected}): this \
         checkpoint cannot be trusted; resume from an older generation (`checkpoint ls --job \
         JOB`) or checkpoint again"
    )]
    CorruptPart {
        /// The data object.
        key: String,
        /// Part number.
        part: u32,
        /// Hash the manifest records.
        expected: String,
        /// Hash of what the store returned.
        actual: String,
    },
    /// An object the manifest names is missing or has the wrong size.
    #[error(
        "{key} is missing or truncated ({detail}): the generation was deleted (retention, gc or by \
         hand) or damaged; resume from another generation or checkpoint again"
    )]
    MissingObject {
        /// Object key.
        key: String,
        /// What was found instead.
        detail: String,
    },
    /// A manifest that cannot be trusted (wrong format, paths escaping the directory, …).
    #[error("the manifest of job {job:?} generation {seq} is unusable: {problem}")]
    BadManifest {
        /// Job.
        job: String,
        /// Generation.
        seq: u64,
        /// What is wrong.
        problem: String,
    },
    /// The job has no complete checkpoint.
    #[error("nothing to resume: job {job:?} has no complete checkpoint under {location}")]
    NothingToResume {
        /// Job.
        job: String,
        /// `s3://bucket/prefix`.
        location: String,
    },
    /// Another writer took the generation first.
    #[error(
        "generation {seq} of job {job:?} was taken by another writer ({detail}); checkpoint again \
         (a new generation is chosen)"
    )]
    Conflict {
        /// Job.
        job: String,
        /// Generation.
        seq: u64,
        /// What happened.
        detail: String,
    },
    /// The local directory cannot be checkpointed or restored as it is.
    #[error("{path}: {problem}")]
    Local {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A local file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing (`reading`, `creating`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The transfer was cancelled.
    #[error(
        "the transfer was cancelled; an unfinished upload is resumed by the next checkpoint of \
         the same job by the same writer"
    )]
    Cancelled,
}

impl CheckpointError {
    /// True when the same call may succeed if made again (network, 5xx, throttling, a lost
    /// race for a generation).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CheckpointError::Unreachable { .. }
                | CheckpointError::Transient { .. }
                | CheckpointError::Conflict { .. }
        )
    }

    /// The HTTP status of a store refusal (`S3` errors).
    pub(super) fn status(&self) -> Option<u16> {
        match self {
            CheckpointError::S3 { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The S3 error code of a store refusal (`S3` errors).
    pub(super) fn code(&self) -> Option<&str> {
        match self {
            CheckpointError::S3 { code, .. } => Some(code),
            _ => None,
        }
    }

    pub(super) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        CheckpointError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// What a failed call was about, for its error.
pub(super) struct Call<'a> {
    pub op: &'static str,
    pub bucket: &'a str,
    pub key: &'a str,
    pub endpoint: &'a str,
}

/// Codes S3 and S3-compatible servers use for credential and authorization failures.
const AUTH_CODES: &[&str] = &[
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "NotSignedUp",
    "AccountProblem",
    "AllAccessDisabled",
];

/// Codes that mean "try again later".
const TRANSIENT_CODES: &[&str] = &[
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeTooSkewed",
    "Throttling",
];

/// Turns an SDK error into a [`CheckpointError`].
pub(super) fn classify<E>(err: SdkError<E, HttpResponse>, call: &Call<'_>) -> CheckpointError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let e = se.err();
            let code = e.code().unwrap_or("").to_owned();
            let message = e.message().unwrap_or("").to_owned();
            from_service(call, status, code, message)
        }
        SdkError::TimeoutError(_) => CheckpointError::Unreachable {
            endpoint: call.endpoint.to_owned(),
            detail: format!("{} timed out", call.op),
        },
        SdkError::DispatchFailure(d) => {
            let detail =
                DisplayErrorContext(&SdkError::<E, HttpResponse>::DispatchFailure(d)).to_string();
            if is_credentials_failure(&detail) {
                CheckpointError::NoCredentials { detail }
            } else {
                CheckpointError::Unreachable {
                    endpoint: call.endpoint.to_owned(),
                    detail,
                }
            }
        }
        SdkError::ResponseError(r) => CheckpointError::Transient {
            op: call.op,
            code: format!("HTTP {}", r.raw().status().as_u16()),
            message: "unreadable answer".into(),
        },
        other => {
            let detail = DisplayErrorContext(&other).to_string();
            if is_credentials_failure(&detail) {
                CheckpointError::NoCredentials { detail }
            } else {
                CheckpointError::S3 {
                    op: call.op,
                    key: call.key.to_owned(),
                    code: "ClientError".into(),
                    status: 0,
                    message: detail,
                }
            }
        }
    }
}

fn is_credentials_failure(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    d.contains("credentials")
        && (d.contains("not loaded")
            || d.contains("no credentials")
            || d.contains("loading credentials"))
}

fn from_service(call: &Call<'_>, status: u16, code: String, message: String) -> CheckpointError {
    if code == "NoSuchBucket" {
        return CheckpointError::NoSuchBucket {
            bucket: call.bucket.to_owned(),
            endpoint: call.endpoint.to_owned(),
        };
    }
    if AUTH_CODES.contains(&code.as_str()) || (code.is_empty() && matches!(status, 401 | 403)) {
        return CheckpointError::Auth {
            code: if code.is_empty() {
                format!("HTTP {status}")
            } else {
                code
            },
            message,
        };
    }
    let unsupported = code == "NotImplemented" || status == 501;
    if !unsupported && (TRANSIENT_CODES.contains(&code.as_str()) || status >= 500 || status == 429)
    {
        return CheckpointError::Transient {
            op: call.op,
            code: if code.is_empty() {
                format!("HTTP {status}")
            } else {
                code
            },
            message,
        };
    }
    if code == "NoSuchKey" || (status == 404 && (code.is_empty() || code == "NotFound")) {
        return CheckpointError::MissingObject {
            key: call.key.to_owned(),
            detail: format!("{} answered 404", call.op),
        };
    }
    CheckpointError::S3 {
        op: call.op,
        key: call.key.to_owned(),
        code: if code.is_empty() {
            format!("HTTP{status}")
        } else {
            code
        },
        status,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Call<'static> {
        Call {
            op: "GetObject",
            bucket: "b",
            key: "k",
            endpoint: "http://127.0.0.1:9",
        }
    }

    #[test]
    fn service_answers_map_to_what_to_do() {
        let c = call();
        let e = |status, code: &str| from_service(&c, status, code.into(), "m".into());
        assert!(matches!(
            e(403, "InvalidAccessKeyId"),
            CheckpointError::Auth { .. }
        ));
        assert!(matches!(
            e(403, "SignatureDoesNotMatch"),
            CheckpointError::Auth { .. }
        ));
        assert!(matches!(e(403, ""), CheckpointError::Auth { .. }));
        assert!(matches!(
            e(404, "NoSuchBucket"),
            CheckpointError::NoSuchBucket { .. }
        ));
        assert!(matches!(
            e(404, "NoSuchKey"),
            CheckpointError::MissingObject { .. }
        ));
        assert!(e(503, "SlowDown").is_retryable());
        assert!(e(500, "").is_retryable());
        assert!(!e(403, "AccessDenied").is_retryable());
        let pre = e(412, "PreconditionFailed");
        assert_eq!(pre.status(), Some(412));
        assert_eq!(pre.code(), Some("PreconditionFailed"));
        let msg = e(404, "NoSuchBucket").to_string();
        assert!(msg.contains("\"b\"") && msg.contains("aws s3 mb"), "{msg}");
    }
}
