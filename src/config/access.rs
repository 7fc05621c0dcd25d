//! `[access]`: pod access for people and agents (`exec`, `cp`, `pods watch`, `mcp`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use super::{describe_figment, ConfigError};

/// Pod access settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Bound on one command run on a pod (`exec`, the MCP `exec` tool).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Channels open at once per pod over its one SSH connection.
    pub max_channels_per_pod: usize,
    /// A pooled SSH connection unused this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Transfer chunk size in bytes (each chunk is checked on the receiving side).
    pub chunk_size: u64,
    /// `pods watch` poll period.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
    /// Offer destructive MCP tools (`terminate_pod`). Off: agents can look and act on files
    /// and commands, not end pods.
    pub allow_terminate: bool,
    /// Where host keys trusted on first use are recorded (used when `reconcile.ssh_host_keys`
    /// is empty); default `$XDG_STATE_HOME/runpod-autoscaler/known_hosts`, else
    /// `~/.local/state/runpod-autoscaler/known_hosts`.
    pub known_hosts: Option<PathBuf>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            // Interactive commands; a long job belongs in the background (`nohup`).
            command_timeout: Duration::from_secs(600),
            max_channels_per_pod: 8,
            idle_timeout: Duration::from_secs(300),
            chunk_size: 8 << 20,
            watch_interval: Duration::from_secs(30),
            allow_terminate: false,
            known_hosts: None,
        }
    }
}

impl AccessConfig {
    /// Reads only the `[access]` table of a configuration file (defaults without a file).
    pub fn load_section(path: Option<&Path>) -> Result<AccessConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Only {
            #[serde(default)]
            access: AccessConfig,
        }
        let Some(path) = path else {
            return Ok(AccessConfig::default());
        };
        if !path.exists() {
            return Err(ConfigError::Parse(format!(
                "config file {} not found",
                path.display()
            )));
        }
        let c = Figment::new()
            .merge(Toml::file_exact(path))
            .extract::<Only>()
            .map_err(|e| ConfigError::Parse(describe_figment(e)))?
            .access;
        if c.chunk_size == 0 || c.max_channels_per_pod == 0 || c.watch_interval.is_zero() {
            return Err(ConfigError::Parse(
                "access.chunk_size, access.max_channels_per_pod and access.watch_interval must be above 0".into(),
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_table_is_optional_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[access]\nallow_terminate = true\nwatch_interval = \"2s\"\n",
        )
        .unwrap();
        let c = AccessConfig::load_section(Some(&p)).unwrap();
        assert!(c.allow_terminate);
        assert_eq!(c.watch_interval, Duration::from_secs(2));
        assert_eq!(c.chunk_size, 8 << 20);
        assert_eq!(c.known_hosts, None);
        std::fs::write(&p, "[access]\nknown_hosts = \"/x/known_hosts\"\n").unwrap();
        let c = AccessConfig::load_section(Some(&p)).unwrap();
        assert_eq!(c.known_hosts, Some(PathBuf::from("/x/known_hosts")));
        std::fs::write(&p, "[access]\nchunk_size = 0\n").unwrap();
        assert!(AccessConfig::load_section(Some(&p)).is_err());
        std::fs::write(&p, "[access]\nbogus = 1\n").unwrap();
        assert!(AccessConfig::load_section(Some(&p)).is_err());
        assert!(!AccessConfig::load_section(None).unwrap().allow_terminate);
    }
}
