//! Real OpenSSH `sshd` processes standing in for RUNNING pods: one per pod, on its own
//! 127.0.0.1 port, authorizing the pod's `PUBLIC_KEY` (from `~/.ssh/authorized_keys` in the
//! pod's home, where RunPod's images put it). Sessions get the pod's home, `PATH` and
//! environment (see [`SshdProcess::spawn`]). Each process is killed by its PID when the pod
//! stops, is preempted or terminated, and when the handle is dropped. A port the API must keep
//! reporting while nothing accepts on it is held by a [`PortHold`].

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::home::sh_quote;

/// Where Debian's openssh-server puts the daemon (sshd needs its absolute path).
pub const DEFAULT_SSHD: &str = "/usr/sbin/sshd";

/// The environment variable marking every process of a pod's SSH sessions; its value is the
/// pod's home. Lets the emulator find (and end) what runs on a pod when the pod stops, the
/// way a stopped container ends its processes, without touching anything else on the host.
pub const POD_MARKER_VAR: &str = "RPA_EMULATED_POD";

/// Rounds of find-and-kill when ending a pod's processes: a process forking while it is
/// killed leaves a child for the next round; a handful covers any shell pipeline.
const KILL_ROUNDS: usize = 5;
/// Longest wait for a new sshd to accept: it starts in milliseconds, seconds on a loaded machine.
const SSHD_START_DEADLINE: Duration = Duration::from_secs(5);

/// Generates an ed25519 key pair with `ssh-keygen` at `path` (private) and `path.pub`; returns
/// the public key line.
pub fn generate_key(path: &Path, comment: &str) -> io::Result<String> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(io::Error::other(format!("ssh-keygen exited with {status}")));
    }
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    Ok(std::fs::read_to_string(PathBuf::from(pub_path))?
        .trim()
        .to_owned())
}

/// What one pod's sshd needs.
#[derive(Debug)]
pub(super) struct SshdSpec<'a> {
    /// The sshd binary (absolute).
    pub(super) binary: &'a Path,
    /// A private directory for `sshd_config`, the session wrapper and the log (not the home:
    /// nothing on the pod needs them). Removed when the process is killed.
    pub(super) run_dir: PathBuf,
    /// The emulator's host key (private half).
    pub(super) host_key: &'a Path,
    /// The pod's home.
    pub(super) home: &'a Path,
    /// Public keys to authorize.
    pub(super) keys: &'a [String],
    /// Exported in every session, in order (a later name wins); `HOME`, `PWD` and `PATH` are
    /// set after them.
    pub(super) env: Vec<(String, String)>,
    /// The port to listen on (127.0.0.1).
    pub(super) port: u16,
}

/// A running sshd. Dropping it kills the process.
#[derive(Debug)]
pub(super) struct SshdProcess {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub(super) port: u16,
    run_dir: PathBuf,
}

impl SshdProcess {
    /// Starts `sshd -D -e -f CONF` for one pod.
    ///
    /// How sessions get the pod's `HOME`, working directory and `PATH` (checked against
    /// OpenSSH 9.2): sshd sets `HOME` from the account's passwd entry (`/root` for every pod,
    /// as all run as root on this host), always `chdir`s there before starting the session, and
    /// sets a compiled-in `PATH`; no sshd_config option changes the directory, and `SetEnv` can
    /// only replace `PATH` with a constant, not put `~/bin` in front of the system `PATH`. So:
    /// - `SetEnv HOME=<home>` (applied by sshd after its own defaults): even the shell sshd
    ///   starts reads the pod's startup files (Debian's bash sources `$HOME/.bashrc` for SSH
    ///   commands), never the host's `/root`; it also sets [`POD_MARKER_VAR`].
    /// - `ForceCommand <run_dir>/session`: a wrapper that enters the home, exports the pod's
    ///   environment (any value, newlines included, which `SetEnv` cannot carry), sets
    ///   `PATH=<home>/bin:$PATH`, then runs the client's command as sshd would,
    ///   `$SHELL -c "$SSH_ORIGINAL_COMMAND"`, or a login shell when there is none (whose
    ///   `/etc/profile` resets `PATH`; the home's `.profile` puts `~/bin` back first).
    ///   Subsystems pass through: sshd puts the subsystem's command (sftp-server) in
    ///   `SSH_ORIGINAL_COMMAND`.
    pub(super) fn spawn(spec: SshdSpec<'_>) -> io::Result<SshdProcess> {
        // Privilege separation directory the daemon insists on.
        let _ = std::fs::create_dir_all("/run/sshd");
        let home = config_path(spec.home)?;
        let host_key = config_path(spec.host_key)?;
        let run_dir = spec.run_dir;
        std::fs::create_dir_all(&run_dir)?;
        // The wrapper holds the pod's env (secrets among it): root only, as in a container.
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))?;
        let run = config_path(&run_dir)?;
        authorize(spec.home, spec.keys)?;
        let session = run_dir.join("session");
        std::fs::write(&session, session_script(spec.home, &spec.env))?;
        std::fs::set_permissions(&session, std::fs::Permissions::from_mode(0o700))?;
        let conf = run_dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\n\
                 AuthorizedKeysFile {home}/.ssh/authorized_keys\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n\
                 PermitUserRC no\nPrintMotd no\n\
                 SetEnv HOME={home} {POD_MARKER_VAR}={home}\n\
                 ForceCommand {run}/session\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\n",
                port = spec.port,
            ),
        )?;
        let log = std::fs::File::create(run_dir.join("sshd.log"))?;
        let child = Command::new(spec.binary)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let mut process = SshdProcess {
            child,
            port: spec.port,
            run_dir,
        };
        process.wait_listening()?;
        Ok(process)
    }

    /// Waits until the daemon accepts on its port, so the mapping the API reports works when it
    /// is reported (tests step time faster than a real sshd starts). Bounded; an sshd that
    /// exits (lost its port) or never listens is an error.
    fn wait_listening(&mut self) -> io::Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = std::time::Instant::now() + SSHD_START_DEADLINE;
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if self.exited() {
                return Err(io::Error::other(format!(
                    "sshd exited before listening on port {}",
                    self.port
                )));
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "sshd not listening on port {} after {SSHD_START_DEADLINE:?}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process id.
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True when the process has exited (e.g. it lost the race for its port).
    pub(super) fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the listening process (by its PID) and reaps it: new connections are refused.
    /// Sessions already open go on, as when a pod's sshd dies.
    pub(super) fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }

    /// Kills the listening process and every connection process it forked (their sessions
    /// end with them): the pod is going away.
    pub(super) fn kill_with_connections(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let tree = descendants(self.pid());
            kill_pids(&tree);
        }
        self.kill();
    }
}

impl Drop for SshdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port reported as a pod's SSH mapping while nothing accepts on it: a bound socket that
/// never listens, so connections are refused and no other process is handed the port
/// (`SO_REUSEADDR` lets it bind over the `TIME_WAIT` connections of the sshd it replaces).
#[derive(Debug)]
pub(super) struct PortHold {
    _socket: tokio::net::TcpSocket,
    /// The held port (127.0.0.1).
    pub(super) port: u16,
}

impl PortHold {
    /// Holds `port`, or a port the OS picks when `port` is 0.
    pub(super) fn bind(port: u16) -> io::Result<PortHold> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
        let port = socket.local_addr()?.port();
        Ok(PortHold {
            _socket: socket,
            port,
        })
    }
}

/// A port the OS says is free on 127.0.0.1 right now.
pub(super) fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Kills (SIGKILL, by PID) every process whose environment marks it as running on a pod whose
/// home is `dir` or inside it ([`POD_MARKER_VAR`]), never this process.
pub(super) fn kill_pod_processes(dir: &Path) {
    for _ in 0..KILL_ROUNDS {
        let pids = marked_processes(dir);
        if pids.is_empty() {
            return;
        }
        kill_pids(&pids);
    }
}

/// Processes whose environment carries [`POD_MARKER_VAR`] naming `dir` or a path inside it.
fn marked_processes(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let prefix = format!("{POD_MARKER_VAR}=");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0).any(|entry| {
                    std::str::from_utf8(entry).is_ok_and(|e| {
                        e.strip_prefix(&prefix)
                            .is_some_and(|v| Path::new(v).starts_with(dir))
                    })
                })
            })
        })
        .collect()
}

/// Every descendant of `root` (not `root` itself), from `/proc/*/stat`. For a pod's sshd
/// (`AdminPod::sshd_pid`): its connection processes and their sessions.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut found = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for c in children.get(&p).into_iter().flatten() {
            if found.insert(*c) {
                todo.push(*c);
            }
        }
    }
    found.into_iter().collect()
}

/// `kill -KILL PID…` (std has no kill by PID; a vanished PID is not an error worth reporting).
fn kill_pids(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let result = Command::new("kill")
        .arg("-s")
        .arg("KILL")
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = result {
        tracing::warn!(error = %e, "emulator: could not run kill to end a pod's processes");
    }
}

/// Writes `keys` to the home's `.ssh/authorized_keys` (what RunPod's images do with
/// `PUBLIC_KEY` at container start), keeping any key already there.
fn authorize(home: &Path, keys: &[String]) -> io::Result<()> {
    let dir = home.join(".ssh");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("authorized_keys");
    let mut text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    for key in keys {
        if !text.lines().any(|l| l.trim() == key.trim()) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(key.trim());
            text.push('\n');
        }
    }
    std::fs::write(&path, text)
}

/// The `ForceCommand` wrapper (see [`SshdProcess::spawn`]).
fn session_script(home: &Path, env: &[(String, String)]) -> String {
    let home_q = sh_quote(&home.to_string_lossy());
    let bin_q = sh_quote(&home.join("bin").to_string_lossy());
    // A PATH of the pod's own (its create request set one) takes the place of sshd's.
    let base_path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| sh_quote(v))
        .unwrap_or_else(|| "\"$PATH\"".to_owned());
    let mut assignments = String::new();
    for (k, v) in env.iter().filter(|(k, _)| k != "PATH" && k != "HOME") {
        assignments.push_str(" \\\n  ");
        assignments.push_str(&sh_quote(&format!("{k}={v}")));
    }
    format!(
        "#!/bin/sh\n\
         # Session wrapper of an emulated pod's sshd (ForceCommand), written by the\n\
         # runpod-autoscaler emulator: the pod's home, environment and PATH, then the command.\n\
         cd {home_q} || {{ echo \"emulated pod: its home $HOME is gone\" >&2; exit 1; }}\n\
         set -- env --{assignments} \\\n  \
         HOME={home_q} PWD={home_q} \"PATH=\"{bin_q}\":\"{base_path} \\\n  \
         \"${{SHELL:-/bin/sh}}\"\n\
         if [ -n \"${{SSH_ORIGINAL_COMMAND+set}}\" ]; then\n  \
         exec \"$@\" -c \"$SSH_ORIGINAL_COMMAND\"\n\
         fi\n\
         exec \"$@\" -l\n"
    )
}

/// Checks that `path` (and so the pod directories under it) can be written in an sshd_config.
pub(super) fn check_config_path(path: &Path) -> io::Result<()> {
    config_path(path).map(|_| ())
}

/// `path` as an sshd_config value: sshd splits on whitespace, treats quotes and `%` specially,
/// so only plain characters are accepted.
fn config_path(path: &Path) -> io::Result<&str> {
    let s = path.to_str().filter(|s| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._+-,@:".contains(&b))
    });
    s.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "path {} has characters an sshd_config line cannot carry (only letters, \
                 digits and /._+-,@: are used); point TMPDIR at a plain directory",
                path.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_paths_must_be_plain() {
        assert!(config_path(Path::new("/tmp/rpa-emulator-1-0/pods/abc")).is_ok());
        for bad in ["/tmp/a b", "/tmp/a\"b", "/tmp/%h", "/tmp/a\nb", ""] {
            let err = config_path(Path::new(bad)).unwrap_err();
            assert!(err.to_string().contains("TMPDIR"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn session_script_quotes_values_and_puts_the_pod_bin_first() {
        let env = vec![
            (
                "PUBLIC_KEY".to_owned(),
                "ssh-ed25519 A x\nssh-ed25519 B y".to_owned(),
            ),
            ("QUOTE".to_owned(), "it's".to_owned()),
        ];
        let s = session_script(Path::new("/w/pods/p1"), &env);
        assert!(
            s.contains("'PUBLIC_KEY=ssh-ed25519 A x\nssh-ed25519 B y'"),
            "{s}"
        );
        assert!(s.contains(r"'QUOTE=it'\''s'"), "{s}");
        assert!(s.contains("\"PATH=\"'/w/pods/p1/bin'\":\"\"$PATH\""), "{s}");
        let own = vec![("PATH".to_owned(), "/opt/x:/usr/bin".to_owned())];
        let s = session_script(Path::new("/w/pods/p1"), &own);
        assert!(
            s.contains("\"PATH=\"'/w/pods/p1/bin'\":\"'/opt/x:/usr/bin'"),
            "{s}"
        );
    }

    #[test]
    fn port_hold_refuses_connections_and_keeps_the_port() {
        let hold = PortHold::bind(0).unwrap();
        assert_ne!(hold.port, 0);
        let err = std::net::TcpStream::connect(("127.0.0.1", hold.port)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        // A listener without SO_REUSEADDR on the held port is refused the port.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        assert!(other
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, hold.port)))
            .is_err());
        let port = hold.port;
        drop(hold);
        assert!(PortHold::bind(port).is_ok(), "released on drop");
    }

    #[test]
    fn descendants_of_a_shell_include_its_children() {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("sleep 30 & wait")
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut tree = descendants(pid);
        while tree.is_empty() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            tree = descendants(pid);
        }
        assert_eq!(tree.len(), 1, "{tree:?}");
        kill_pids(&tree);
        let _ = child.kill();
        let _ = child.wait();
    }
}
