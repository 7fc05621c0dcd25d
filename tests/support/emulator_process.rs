//! The emulator as its own process (`runpod-autoscaler emulator` on a free loopback port), for
//! the benchmarks that measure against it: their own memory is then what RSS shows. Included
//! by path from `benches/` and `examples/`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running emulator process; stopped (SIGTERM, so it kills every pod's sshd) when dropped.
pub struct EmulatorProcess {
    child: Child,
    /// Its REST base URL.
    pub api_url: String,
    /// Its GraphQL URL.
    pub graphql_url: String,
    _dir: tempfile::TempDir,
}

impl EmulatorProcess {
    /// Starts `binary emulator` accepting `key`, with `config` (emulator TOML); returns once it
    /// printed its listening line.
    pub fn start(binary: &Path, key: &str, config: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("emulator.toml");
        std::fs::write(&path, config).expect("writing the emulator config");
        let mut child = Command::new(binary)
            .args(["emulator", "--listen", "127.0.0.1:0", "--api-key", key])
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("reading the emulator's listening line");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("emulator listening line {line:?}: {e}"));
        let url = |k: &str| {
            v[k].as_str()
                .expect("a URL in the listening line")
                .to_owned()
        };
        EmulatorProcess {
            api_url: url("api_url"),
            graphql_url: url("graphql_url"),
            child,
            _dir: dir,
        }
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
