//! An S3-compatible server for checkpoint tests: s3s-fs (`RPA_S3S_BIN`, installed by
//! `scripts/test.sh`) on a free 127.0.0.1 port with a temporary data directory, SigV4 enforced
//! with a test key pair, killed by PID on drop. Objects are plain files under
//! `<data>/<bucket>/<key>`, which lets tests damage them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use runpod_autoscaler::config::CheckpointConfig;
use runpod_autoscaler::model::Secret;

use super::{binary, wait_for_port, Guard};

/// The access key every test server accepts.
pub const ACCESS_KEY: &str = "rpa-test-access";
/// Its secret.
pub const SECRET_KEY: &str = "rpa-test-secret-0123456789";
/// The bucket [`S3s::start`] creates.
pub const BUCKET: &str = "checkpoints";

/// A running s3s-fs.
pub struct S3s {
    /// `127.0.0.1:port`.
    pub addr: SocketAddr,
    /// The process and its directory (`data/` holds the buckets).
    pub guard: Guard,
}

impl S3s {
    /// Starts s3s-fs with bucket [`BUCKET`] and waits until it accepts connections.
    pub async fn start() -> S3s {
        let bin = binary("RPA_S3S_BIN");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // A bucket is a directory of the data root.
        std::fs::create_dir_all(data.join(BUCKET)).unwrap();
        let log = std::fs::File::create(dir.path().join("s3s.log")).unwrap();
        let port = super::free_port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting s3s-fs");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let guard = Guard {
            child: Some(child),
            dir,
        };
        wait_for_port(addr, "s3s-fs to accept connections").await;
        S3s { addr, guard }
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's data root (`<root>/<bucket>/<key>` are the objects).
    pub fn data_dir(&self) -> PathBuf {
        self.guard.dir.path().join("data")
    }

    /// The file holding object `key` of [`BUCKET`].
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.data_dir().join(BUCKET).join(key)
    }

    /// Parts of unfinished multipart uploads held by the server (`.upload_id-*.part-*`).
    pub fn pending_parts(&self) -> usize {
        std::fs::read_dir(self.data_dir())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(".upload_id-") && n.contains(".part-"))
            })
            .count()
    }

    /// [`Self::pending_parts`] once the count has held still for half a second (giving up
    /// the wait after 10 s): a part whose body reached the server before its upload was
    /// cancelled can still land a moment after the client returned.
    pub async fn settled_pending_parts(&self) -> usize {
        const QUIET: std::time::Duration = std::time::Duration::from_millis(500);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut last = self.pending_parts();
        loop {
            tokio::time::sleep(QUIET).await;
            let now = self.pending_parts();
            if now == last || tokio::time::Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }

    /// A checkpoint configuration for this server under `prefix`, with the test key pair and
    /// the smallest part size S3 allows (tests then see several parts without large files).
    pub fn config(&self, prefix: &str) -> CheckpointConfig {
        let mut c = CheckpointConfig::for_bucket(BUCKET);
        c.prefix = prefix.to_owned();
        c.endpoint = Some(self.endpoint());
        c.region = Some("us-east-1".into());
        c.access_key_id = Some(ACCESS_KEY.into());
        c.secret_access_key = Some(Secret::new(SECRET_KEY));
        c.part_size = 5 * 1024 * 1024;
        c.parallelism = 4;
        c
    }

    /// The standard AWS environment pointing at this server (for the binary and the AWS CLI).
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            // Never ask an instance metadata service (no such thing on a test machine).
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }
}
