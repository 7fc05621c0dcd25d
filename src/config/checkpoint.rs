//! `[checkpoint]`: where GPU jobs checkpoint to (an S3-compatible store such as MinIO) and how
//! transfers are shaped. Plain data with validation; `checkpoint::S3Store` is built from it.

use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use super::{describe_figment, ConfigError, ENV_PREFIX};
use crate::model::Secret;

/// One mebibyte.
const MIB: u64 = 1024 * 1024;
/// S3's smallest part (every part but the last must be at least this).
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// More requests in flight than this stops helping against one endpoint and only costs memory
/// (each holds one part in memory).
pub const MAX_PARALLELISM: usize = 64;

/// `[checkpoint]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Bucket holding every checkpoint (3–63 characters: lowercase letters, digits, `.`, `-`).
    pub bucket: String,
    /// Key prefix under which jobs live (`<prefix>/<job>/<seq>/…`); empty: the bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// Endpoint URL (MinIO: `http://minio.storage:9000`); default: `AWS_ENDPOINT_URL`, else AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region; default: `AWS_REGION` (or the profile's), else `us-east-1` (MinIO ignores it).
    #[serde(default)]
    pub region: Option<String>,
    /// Access key id; default: the standard AWS chain (environment, profile, web identity, …).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key (secret; set together with `access_key_id`).
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// Path-style addressing (`<endpoint>/<bucket>/<key>`), what MinIO and most S3-compatible
    /// servers expect; `false` for virtual-hosted style.
    #[serde(default = "defaults::yes")]
    pub path_style: bool,
    /// Multipart part size (bytes, or `"16MiB"`); grown automatically past 10,000 parts.
    #[serde(default = "defaults::part_size", with = "byte_size")]
    pub part_size: u64,
    /// Parts transferred at once (memory: about `(parallelism + 2) × part_size`).
    #[serde(default = "defaults::parallelism")]
    pub parallelism: usize,
    /// Complete generations kept per job; older ones are deleted after each checkpoint and by
    /// `checkpoint gc`.
    #[serde(default = "defaults::keep")]
    pub keep: usize,
    /// An unfinished generation (claimed, no manifest) older than this is abandoned: `gc`
    /// aborts its upload and deletes it.
    #[serde(default = "defaults::abandon_after", with = "humantime_serde")]
    pub abandon_after: Duration,
}

mod defaults {
    use super::*;
    pub fn yes() -> bool {
        true
    }
    /// 16 MiB: large enough that per-request overhead is small next to the transfer on a LAN,
    /// small enough that 8 parts in flight hold ~160 MiB of memory.
    pub fn part_size() -> u64 {
        16 * MIB
    }
    /// Eight requests keep a LAN link to MinIO busy without loading a small pod's CPU.
    pub fn parallelism() -> usize {
        8
    }
    /// The newest checkpoint plus two older ones to fall back on.
    pub fn keep() -> usize {
        3
    }
    /// A day: far beyond any single checkpoint upload, so a slow writer is never collected.
    pub fn abandon_after() -> Duration {
        Duration::from_secs(24 * 3600)
    }
}

impl CheckpointConfig {
    /// A configuration for `bucket` with every default (endpoint, region and credentials then
    /// come from the standard AWS environment).
    pub fn for_bucket(bucket: impl Into<String>) -> CheckpointConfig {
        CheckpointConfig {
            bucket: bucket.into(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            path_style: true,
            part_size: defaults::part_size(),
            parallelism: defaults::parallelism(),
            keep: defaults::keep(),
            abandon_after: defaults::abandon_after(),
        }
    }

    /// Checks every key; errors name the key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: String, fix| Err(ConfigError::Invalid { key, problem, fix });
        let b = &self.bucket;
        let bucket_chars = b
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
        let ends_ok = b
            .bytes()
            .next()
            .zip(b.bytes().last())
            .is_some_and(|(f, l)| f.is_ascii_alphanumeric() && l.is_ascii_alphanumeric());
        if !(3..=63).contains(&b.len()) || !bucket_chars || !ends_ok || b.contains("..") {
            return invalid(
                "checkpoint.bucket",
                format!("{b:?} is not a valid bucket name"),
                "use 3-63 characters: lowercase letters, digits, '.' and '-', starting and \
                 ending with a letter or digit, e.g. \"gpu-checkpoints\"",
            );
        }
        if let Err(problem) = check_prefix(&self.prefix) {
            return invalid(
                "checkpoint.prefix",
                format!("{:?} {problem}", self.prefix),
                "use '/'-separated names without empty, '.' or '..' segments and without a \
                 leading or trailing '/', e.g. \"prod/checkpoints\" (or leave it empty)",
            );
        }
        if let Some(e) = &self.endpoint {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                return invalid(
                    "checkpoint.endpoint",
                    format!("{e:?} is not an http(s) URL"),
                    "set e.g. \"http://minio.storage:9000\", or remove it to use \
                     AWS_ENDPOINT_URL or AWS itself",
                );
            }
        }
        if self.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return invalid(
                "checkpoint.region",
                "is empty".into(),
                "set e.g. \"us-east-1\", or remove it",
            );
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(id), Some(secret)) if id.trim().is_empty() || secret.is_empty() => {
                return invalid(
                    "checkpoint.access_key_id",
                    "or checkpoint.secret_access_key is empty".into(),
                    "set both, or remove both to use the standard AWS credential chain",
                );
            }
            (Some(_), None) | (None, Some(_)) => {
                return invalid(
                    "checkpoint.access_key_id",
                    "is set without checkpoint.secret_access_key, or the other way round".into(),
                    "set both, or remove both to use the standard AWS credential chain",
                );
            }
            _ => {}
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return invalid(
                "checkpoint.part_size",
                format!("{} bytes is outside S3's part limits", self.part_size),
                "set between \"5MiB\" and \"5GiB\", e.g. \"16MiB\"",
            );
        }
        if !(1..=MAX_PARALLELISM).contains(&self.parallelism) {
            return invalid(
                "checkpoint.parallelism",
                format!("{} is outside 1-{MAX_PARALLELISM}", self.parallelism),
                "set e.g. 8",
            );
        }
        if self.keep == 0 {
            return invalid(
                "checkpoint.keep",
                "is 0, so every checkpoint would be deleted".into(),
                "set 1 or more (3 keeps two to fall back on)",
            );
        }
        Ok(())
    }

    /// The store settings of the checkpoint commands: the `[checkpoint]` table of `path` (if
    /// given), then its environment overrides (`RUNPOD_AUTOSCALER__CHECKPOINT__BUCKET`,
    /// `…__KEEP`, …, which is how the reconciler hands its settings to workers), then the
    /// `--bucket`/`--prefix` flags. `None` when none of them names a bucket.
    /// Not validated here: the caller validates what it will use.
    pub fn load_section(
        path: Option<&Path>,
        bucket: Option<&str>,
        prefix: Option<&str>,
    ) -> Result<Option<CheckpointConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct Only {
            #[serde(default)]
            checkpoint: Option<CheckpointConfig>,
        }
        let env_keys: Vec<String> = [
            "bucket",
            "prefix",
            "endpoint",
            "region",
            "access_key_id",
            "secret_access_key",
            "path_style",
            "part_size",
            "parallelism",
            "keep",
            "abandon_after",
        ]
        .iter()
        .map(|k| format!("checkpoint.{k}"))
        .collect();
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Parse(format!(
                    "config file {} not found",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .split("__")
                .lowercase(true)
                .only(&env_keys.iter().map(String::as_str).collect::<Vec<_>>()),
        );
        if let Some(bucket) = bucket {
            figment = figment.merge(Serialized::default("checkpoint.bucket", bucket));
        }
        if let Some(prefix) = prefix {
            figment = figment.merge(Serialized::default("checkpoint.prefix", prefix));
        }
        if !figment.contains("checkpoint") {
            return Ok(None);
        }
        figment
            .extract::<Only>()
            .map(|o| o.checkpoint)
            .map_err(|e| ConfigError::Parse(describe_figment(e)))
    }
}

/// Why `prefix` cannot be a key prefix, if it cannot.
fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.len() > 512 {
        return Err("is longer than 512 bytes");
    }
    if prefix.chars().any(|c| c.is_control() || c == '\\') {
        return Err("contains a control character or a backslash");
    }
    if prefix
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("has an empty, '.' or '..' segment (or a leading/trailing '/')");
    }
    Ok(())
}

/// Byte sizes written as an integer (bytes) or a string with a unit: `"16MiB"`, `"64 MiB"`,
/// `"5MB"`, `"1GiB"`.
pub mod byte_size {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses `"16MiB"`-style sizes.
    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a size like \"16MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
                ))
            }
        };
        n.checked_mul(mult)
            .ok_or_else(|| format!("{text:?} is too large"))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }

    /// Serde `deserialize_with`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(n),
            Raw::Text(s) => parse(&s).map_err(serde::de::Error::custom),
        }
    }

    /// Serde `serialize_with` (plain bytes).
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CheckpointConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Only {
            checkpoint: CheckpointConfig,
        }
        let c = super::super::parse_toml::<Only>(text)?.checkpoint;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_and_units() {
        let c = parse("[checkpoint]\nbucket = \"ckpt\"\npart_size = \"64MiB\"").unwrap();
        assert_eq!(c.part_size, 64 * MIB);
        assert_eq!(c.parallelism, 8);
        assert_eq!(c.keep, 3);
        assert!(c.path_style);
        assert_eq!(c.abandon_after, Duration::from_secs(86_400));
        let c = parse("[checkpoint]\nbucket = \"ckpt\"\npart_size = 8388608").unwrap();
        assert_eq!(c.part_size, 8 * MIB);
        assert_eq!(byte_size::parse("5 MB").unwrap(), 5_000_000);
        assert!(byte_size::parse("5 parsecs").is_err());
        assert!(byte_size::parse("99999999999999GiB").is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("bucket = \"A\"", "checkpoint.bucket"),
            ("bucket = \"Bad_Bucket\"", "checkpoint.bucket"),
            ("bucket = \"ok-b\"\nprefix = \"/x\"", "checkpoint.prefix"),
            (
                "bucket = \"ok-b\"\nprefix = \"a/../b\"",
                "checkpoint.prefix",
            ),
            ("bucket = \"ok-b\"\nprefix = \"a/\"", "checkpoint.prefix"),
            (
                "bucket = \"ok-b\"\nendpoint = \"minio:9000\"",
                "checkpoint.endpoint",
            ),
            (
                "bucket = \"ok-b\"\naccess_key_id = \"k\"",
                "checkpoint.access_key_id",
            ),
            (
                "bucket = \"ok-b\"\npart_size = \"1MiB\"",
                "checkpoint.part_size",
            ),
            (
                "bucket = \"ok-b\"\npart_size = \"6GiB\"",
                "checkpoint.part_size",
            ),
            ("bucket = \"ok-b\"\npart_size = \"6 furlongs\"", "furlongs"),
            (
                "bucket = \"ok-b\"\nparallelism = 0",
                "checkpoint.parallelism",
            ),
            ("bucket = \"ok-b\"\nkeep = 0", "checkpoint.keep"),
            ("bucket = \"ok-b\"\nregion = \" \"", "checkpoint.region"),
            ("bucket = \"ok-b\"\nbukket = 1", "bukket"),
        ];
        for (body, key) in cases {
            let err = parse(&format!("[checkpoint]\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "expected {key:?} in: {err}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let c = parse(
            "[checkpoint]\nbucket = \"ckpt\"\naccess_key_id = \"AK\"\nsecret_access_key = \"S3CR3T\"",
        )
        .unwrap();
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("S3CR3T"), "{shown}");
        assert_eq!(c.secret_access_key.unwrap().expose(), "S3CR3T");
    }
}
