//! Host keys remembered for trust on first use ([`KnownHosts`]), in memory or persisted to a
//! known-hosts file so a key first seen by one CLI invocation is pinned for the next.
//!
//! File format, one entry a line: `<pod id> <host:port> <key type> <base64 key>` (the key in its
//! OpenSSH public form; `host:port` is where it was first seen). `#` comments and blank lines are
//! kept. A pod's key is looked up by pod id: RunPod reuses addresses, a pod's key must not
//! change. New entries are appended by rewriting the file to a temporary sibling and renaming it
//! over the original (atomic); the file is re-read first, so entries another process added since
//! are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::JoinError;

/// Remembered host keys for trust on first use, keyed by pod id (or `host:port`). Clones share
/// the store.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts(Arc<Store>);

#[derive(Debug, Default)]
struct Store {
    keys: Mutex<HashMap<String, String>>,
    file: Option<PathBuf>,
}

/// One entry of the file.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    /// 1-based line number.
    line: usize,
    host_id: String,
    key: String,
}

impl KnownHosts {
    /// An empty store, for this process only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store backed by `path`, read now (a missing file is an empty store; an unreadable or
    /// corrupt one is an error naming the file and line).
    pub fn persistent(path: &Path) -> Result<Self, JoinError> {
        let entries = read(path)?;
        let keys = entries.into_iter().map(|e| (e.host_id, e.key)).collect();
        Ok(KnownHosts(Arc::new(Store {
            keys: Mutex::new(keys),
            file: Some(path.to_owned()),
        })))
    }

    /// The default file: `$XDG_STATE_HOME/runpod-autoscaler/known_hosts`, else
    /// `~/.local/state/runpod-autoscaler/known_hosts`; `None` when neither variable is set.
    pub fn default_path() -> Option<PathBuf> {
        let var = |v| {
            std::env::var_os(v)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        };
        let state =
            var("XDG_STATE_HOME").or_else(|| var("HOME").map(|h| h.join(".local/state")))?;
        Some(state.join("runpod-autoscaler").join("known_hosts"))
    }

    /// The backing file, when persistent.
    pub fn file(&self) -> Option<&Path> {
        self.0.file.as_deref()
    }

    /// The remembered key of `host_id` (key type and base64), when any.
    pub fn get(&self, host_id: &str) -> Option<String> {
        self.keys().get(host_id).cloned()
    }

    /// Forgets `host_id` in memory (e.g. the pod was terminated). A persisted entry stays: the
    /// file is read again before a key is trusted, and pod ids are never reused.
    pub fn forget(&self, host_id: &str) {
        self.keys().remove(host_id);
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.0.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts `seen` (key type and base64) for `host_id` reached at `addr` when it is the
    /// remembered key, or when none is remembered (then records it, in the file too); refuses
    /// a different key with [`JoinError::HostKeyMismatch`].
    pub(crate) fn check(&self, host_id: &str, addr: &str, seen: &str) -> Result<(), JoinError> {
        let mut keys = self.keys();
        if let Some(known) = keys.get(host_id) {
            return if known == seen {
                Ok(())
            } else {
                Err(self.mismatch(host_id, addr))
            };
        }
        if let Some(path) = &self.0.file {
            // Another process may have recorded this pod since we read the file.
            let entries = read(path)?;
            match entries.iter().find(|e| e.host_id == host_id) {
                Some(e) if e.key == seen => {}
                Some(e) => return Err(mismatch_in(path, e, addr)),
                None => append(path, &format!("{host_id} {addr} {seen}"))?,
            }
        }
        keys.insert(host_id.to_owned(), seen.to_owned());
        Ok(())
    }

    fn mismatch(&self, host_id: &str, addr: &str) -> JoinError {
        let entry = self.0.file.as_deref().and_then(|path| {
            let e = read(path)
                .ok()?
                .into_iter()
                .find(|e| e.host_id == host_id)?;
            Some(mismatch_in(path, &e, addr))
        });
        entry.unwrap_or_else(|| JoinError::HostKeyMismatch {
            addr: addr.to_owned(),
            hint: String::new(),
        })
    }
}

fn mismatch_in(path: &Path, e: &Entry, addr: &str) -> JoinError {
    JoinError::HostKeyMismatch {
        addr: addr.to_owned(),
        hint: format!(
            "; pod {} was pinned to another key in {} line {}: remove that line if the pod's \
             host key legitimately changed",
            e.host_id,
            path.display(),
            e.line
        ),
    }
}

fn file_error(path: &Path, what: impl std::fmt::Display) -> JoinError {
    JoinError::KnownHosts(format!("{}: {what}", path.display()))
}

/// The file's entries; a missing file has none.
fn read(path: &Path) -> Result<Vec<Entry>, JoinError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_error(path, e)),
    };
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, JoinError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let bad = |why: &str| {
            file_error(
                path,
                format!(
                    "line {line} is not `<pod id> <host:port> <key type> <base64 key>`: {why} \
                     (fix or delete that line)"
                ),
            )
        };
        let fields: Vec<&str> = raw.split_whitespace().collect();
        let [host_id, _addr, kind, data] = fields[..] else {
            return Err(bad(&format!("{} fields", fields.len())));
        };
        let key = format!("{kind} {data}");
        if russh::keys::PublicKey::from_openssh(&key).is_err() {
            return Err(bad("not an OpenSSH public key"));
        }
        if let Some(first) = entries.iter().find(|e| e.host_id == host_id) {
            return Err(bad(&format!(
                "pod {host_id} is already pinned at line {}",
                first.line
            )));
        }
        entries.push(Entry {
            line,
            host_id: host_id.to_owned(),
            key,
        });
    }
    Ok(entries)
}

/// Appends `entry` as a line: the whole file written to a temporary sibling, then renamed over it.
fn append(path: &Path, entry: &str) -> Result<(), JoinError> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# runpod-autoscaler: pod host keys trusted on first use \
             (<pod id> <host:port> <key type> <key>)\n"
                .to_owned()
        }
        Err(e) => return Err(file_error(path, e)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(entry);
    text.push('\n');
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, &text)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_error(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINdOJTEllo4h8XOzU3P02gNGlUk0as9hJkjHmxMReaQk";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINVge7aNrc+EaQZOekSNeHgfSHYQNRgm/vIzrljDLfai";

    #[test]
    fn first_use_is_recorded_and_a_different_key_refused_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/rpa/known_hosts");
        let k = KnownHosts::persistent(&path).unwrap();
        k.check("pod1", "127.0.0.1:4000", A).unwrap();
        k.check("pod1", "127.0.0.1:4000", A).unwrap();
        k.check("pod2", "127.0.0.1:4001", B).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("\npod1 127.0.0.1:4000 {A}\n")),
            "{text}"
        );

        // A new process reads the pins; the other key for pod1 is refused, naming the line.
        let again = KnownHosts::persistent(&path).unwrap();
        assert_eq!(again.get("pod1").as_deref(), Some(A));
        let err = again.check("pod1", "127.0.0.1:4999", B).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, JoinError::HostKeyMismatch { .. }), "{msg}");
        assert!(
            msg.contains(&format!("{} line 2", path.display())) && msg.contains("pod1"),
            "{msg}"
        );
        // Forgetting in memory does not unpin: the file is read again.
        again.forget("pod1");
        assert!(again.check("pod1", "127.0.0.1:4000", B).is_err());
        // Another process's entry, written after we read, is honoured too.
        let other = KnownHosts::persistent(&path).unwrap();
        other.check("pod3", "h:1", A).unwrap();
        assert!(again.check("pod3", "h:1", B).is_err());
        assert!(!dir.path().join("state/rpa").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        for (text, want) in [
            (format!("# c\n\npod1 h:1 {A}\npod2 h:2\n"), "line 4"),
            ("pod1 h:1 ssh-ed25519 notbase64!!\n".to_owned(), "line 1"),
            (
                format!("pod1 h:1 {A}\npod1 h:2 {B}\n"),
                "already pinned at line 1",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = KnownHosts::persistent(&path).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("known_hosts"), "{err}");
        }
        std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        assert!(KnownHosts::persistent(&path).is_err());
    }

    #[test]
    fn in_memory_trust_names_no_file() {
        let k = KnownHosts::new();
        k.check("p", "h:1", A).unwrap();
        let err = k.check("p", "h:1", B).unwrap_err().to_string();
        assert!(!err.contains("line"), "{err}");
        assert!(k.file().is_none());
    }
}
