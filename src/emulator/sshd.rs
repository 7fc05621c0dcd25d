//! Real OpenSSH `sshd` processes standing in for RUNNING pods: one per pod, on its own free
//! 127.0.0.1 port, authorizing the pod's `PUBLIC_KEY`. Each process is killed by its PID when
//! the pod stops, is preempted or terminated, and when the handle is dropped.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where Debian's openssh-server puts the daemon (sshd needs its absolute path).
pub const DEFAULT_SSHD: &str = "/usr/sbin/sshd";

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

/// A running sshd. Dropping it kills the process.
#[derive(Debug)]
pub struct SshdProcess {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    dir: PathBuf,
}

impl SshdProcess {
    /// Starts `sshd -D -e -f CONF` for one pod under `work_dir/<pod_id>/`, authorizing `keys`.
    pub fn spawn(
        sshd: &Path,
        work_dir: &Path,
        pod_id: &str,
        host_key: &Path,
        keys: &[String],
    ) -> io::Result<SshdProcess> {
        // Privilege separation directory the daemon insists on.
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = work_dir.join(pod_id);
        std::fs::create_dir_all(&dir)?;
        let authorized = dir.join("authorized_keys");
        std::fs::write(&authorized, keys.join("\n") + "\n")?;
        let port = free_port()?;
        let conf = dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\n",
                host_key.display(),
                authorized.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("sshd.log"))?;
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(SshdProcess { child, port, dir })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True when the process has exited (e.g. it lost the race for its port).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process (by its PID) and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for SshdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port the OS says is free on 127.0.0.1 right now.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
