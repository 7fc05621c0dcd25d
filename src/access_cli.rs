//! Pod access from the command line: `exec`, `cp`, `pods watch`, `cost` and `mcp`. API
//! settings come from the same place as `pods list` (`[runpod]` or `RUNPOD_*`); the SSH key
//! from `--identity` or `reconcile.ssh_key_file`; host keys from `reconcile.ssh_host_keys`
//! (pinned) or trusted on first use per pod.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use runpod_autoscaler::access::transfer::{TransferReport, TransferSettings};
use runpod_autoscaler::access::{cost, watch, PodAccess};
use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::config::{AccessConfig, ReconcileConfig};
use runpod_autoscaler::join::pool::{PoolSettings, SshPool};
use runpod_autoscaler::join::{HostKeyPolicy, KnownHosts, Output, SshKey};
use runpod_autoscaler::mcp::{self, PlanSource, PodTools};

use crate::cli;

/// Where settings and the key come from.
pub struct Opts {
    /// Configuration file (`[runpod]`, `[access]`, `reconcile.ssh_key_file`,
    /// `reconcile.ssh_host_keys`).
    pub config: Option<PathBuf>,
    /// SSH private key (overrides `reconcile.ssh_key_file`).
    pub identity: Option<PathBuf>,
}

/// Pod access as `opts` describe it, with the `[access]` settings.
fn pod_access(opts: &Opts) -> Result<(PodAccess, AccessConfig)> {
    let config = opts.config.as_deref();
    let provider = cli::client(config)?;
    let settings = AccessConfig::load_section(config)?;
    let reconcile = match config {
        Some(p) => ReconcileConfig::load_section(p)?,
        None => ReconcileConfig::default(),
    };
    let key_file = opts
        .identity
        .clone()
        .or(reconcile.ssh_key_file.clone())
        .context("no SSH key: pass --identity FILE or set reconcile.ssh_key_file")?;
    let key = SshKey::load(&key_file).with_context(|| format!("loading {}", key_file.display()))?;
    let policy = if reconcile.ssh_host_keys.is_empty() {
        // Trust on first use, pinned across invocations by the known-hosts file.
        let file = settings
            .known_hosts
            .clone()
            .or_else(KnownHosts::default_path)
            .context(
                "no known-hosts file for trust on first use: set access.known_hosts \
             (neither XDG_STATE_HOME nor HOME is set)",
            )?;
        HostKeyPolicy::TrustOnFirstUse(KnownHosts::persistent(&file)?)
    } else {
        HostKeyPolicy::Pinned(reconcile.ssh_host_keys.clone())
    };
    let pool = SshPool::new(
        key,
        policy,
        PoolSettings {
            idle_timeout: settings.idle_timeout,
            per_pod: settings.max_channels_per_pod,
            ..PoolSettings::default()
        },
    );
    let access = PodAccess::new(Arc::new(provider), pool, settings.command_timeout);
    Ok((access, settings))
}

/// Exit status of a command that ended without one (killed by a signal), as `ssh` does.
const NO_STATUS: u8 = 255;

fn exit_code(status: Option<u32>) -> u8 {
    status.map_or(NO_STATUS, |s| u8::try_from(s).unwrap_or(NO_STATUS))
}

/// `exec POD -- CMD…`: streams the command's output and returns its exit status. `--all`:
/// every owned RUNNING pod at once, each line prefixed with `[pod] `; the highest status wins.
pub async fn exec(opts: &Opts, pod: Option<String>, all: bool, command: &[String]) -> Result<u8> {
    let (access, _) = pod_access(opts)?;
    let line = command.join(" ");
    if line.trim().is_empty() {
        bail!("no command: exec POD -- CMD...");
    }
    if !all {
        let Some(pod) = pod else {
            bail!("give a pod id or --all");
        };
        let status = access
            .exec_streaming(&pod, &line, |o| {
                // A closed stdout (e.g. piped into `head`) is not our failure.
                let _ = match o {
                    Output::Stdout(d) => std::io::stdout().write_all(d),
                    Output::Stderr(d) => std::io::stderr().write_all(d),
                };
            })
            .await?;
        let _ = std::io::stdout().flush();
        return Ok(exit_code(status));
    }
    let pods = access.pods().await?;
    let ready: Vec<_> = pods.iter().filter(|p| p.is_ready()).collect();
    if ready.is_empty() {
        bail!(
            "no RUNNING pods with SSH among ours ({} listed)",
            pods.len()
        );
    }
    let runs = ready.iter().map(|p| {
        let access = access.clone();
        let id = p.id.to_string();
        let line = line.clone();
        async move {
            let mut out = Prefixed::new(&id, false);
            let mut err = Prefixed::new(&id, true);
            let r = access
                .exec_streaming(&id, &line, |o| match o {
                    Output::Stdout(d) => out.push(d),
                    Output::Stderr(d) => err.push(d),
                })
                .await;
            out.finish();
            err.finish();
            (id, r)
        }
    });
    let mut worst = 0u8;
    for (id, r) in join_all(runs).await {
        match r {
            Ok(s) => {
                let code = exit_code(s);
                if code != 0 {
                    eprintln!("[{id}] exit {code}");
                }
                worst = worst.max(code);
            }
            Err(e) => {
                eprintln!("[{id}] error: {e}");
                worst = NO_STATUS;
            }
        }
    }
    Ok(worst)
}

/// Output of one pod, written a whole line at a time with its prefix.
struct Prefixed {
    prefix: String,
    stderr: bool,
    buf: Vec<u8>,
}

impl Prefixed {
    fn new(pod: &str, stderr: bool) -> Self {
        Prefixed {
            prefix: format!("[{pod}] "),
            stderr,
            buf: Vec::new(),
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            self.write(&line);
        }
    }

    fn finish(&mut self) {
        if !self.buf.is_empty() {
            let mut line = std::mem::take(&mut self.buf);
            line.push(b'\n');
            self.write(&line);
        }
    }

    fn write(&self, line: &[u8]) {
        let mut whole = self.prefix.clone().into_bytes();
        whole.extend_from_slice(line);
        let _ = if self.stderr {
            std::io::stderr().write_all(&whole)
        } else {
            std::io::stdout().write_all(&whole)
        };
    }
}

/// One side of `cp`: a pod path or a local one.
#[derive(Debug, PartialEq, Eq)]
enum Side {
    Pod(String, String),
    Local(PathBuf),
}

/// `POD:PATH` is a pod path (as for `scp`: a colon before any slash); anything else is local.
fn side(s: &str) -> Side {
    match s.split_once(':') {
        Some((pod, path)) if !pod.is_empty() && !pod.contains('/') => Side::Pod(
            pod.to_owned(),
            if path.is_empty() {
                ".".into()
            } else {
                path.to_owned()
            },
        ),
        _ => Side::Local(PathBuf::from(s)),
    }
}

/// `cp SRC DST`: one side `POD:PATH`, the other local.
pub async fn cp(
    opts: &Opts,
    src: &str,
    dst: &str,
    chunk_size: Option<u64>,
    json: bool,
) -> Result<()> {
    let (access, settings) = pod_access(opts)?;
    let transfer = TransferSettings {
        chunk_size: chunk_size.unwrap_or(settings.chunk_size),
        progress: !json,
        ..TransferSettings::default()
    };
    let report: TransferReport = match (side(src), side(dst)) {
        (Side::Local(l), Side::Pod(pod, r)) => access.upload(&pod, &l, &r, &transfer).await?,
        (Side::Pod(pod, r), Side::Local(l)) => access.download(&pod, &r, &l, &transfer).await?,
        (Side::Pod(..), Side::Pod(..)) => {
            bail!("both sides are on pods: copy through this machine")
        }
        (Side::Local(..), Side::Local(..)) => {
            bail!("neither side is on a pod: write one as POD:PATH")
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} {} file(s), {} bytes in {:.2}s ({:.1} MB/s); {} chunk(s) sent, {} resumed; SHA-256 verified",
            if report.direction == runpod_autoscaler::access::transfer::Direction::Upload {
                "uploaded"
            } else {
                "downloaded"
            },
            report.files.len(),
            report.bytes,
            report.seconds,
            report.mb_per_s,
            report.sent_chunks,
            report.resumed_chunks,
        );
    }
    Ok(())
}

/// `pods watch`: transitions and GPU utilization, one line per event, until interrupted.
pub async fn watch(opts: &Opts, interval: Option<std::time::Duration>, json: bool) -> Result<()> {
    let (access, settings) = pod_access(opts)?;
    let interval = interval.unwrap_or(settings.watch_interval);
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
    watch::run(
        &access,
        Arc::new(SystemClock),
        interval,
        stop,
        |e| {
            if json {
                println!("{}", serde_json::to_string(&e).unwrap_or_default());
            } else {
                let util = if e.gpu_utilization.is_empty() {
                    String::new()
                } else {
                    format!(
                        " gpu {}",
                        e.gpu_utilization
                            .iter()
                            .map(|u| format!("{u:.0}%"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                };
                println!(
                    "{} {:<16} {:<11} {}{}{}",
                    humantime::format_rfc3339_seconds(e.at.to_system()),
                    e.pod,
                    e.event,
                    e.state,
                    util,
                    e.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                );
            }
            let _ = std::io::stdout().flush();
        },
        |e| eprintln!("warning: {e}; trying again next poll"),
    )
    .await?;
    Ok(())
}

/// `cost`: $/h now and spend so far, by GPU type, with a total.
pub async fn cost(config: Option<&Path>, json: bool) -> Result<()> {
    let client = cli::client(config)?;
    let pods = runpod_autoscaler::provider::CloudProvider::list(&client)
        .await
        .context("listing pods")?;
    let billed = client.billing(None).await.context("reading billing")?;
    let lines = cost::by_gpu_type(&pods, &billed.per_pod);
    if json {
        println!("{}", serde_json::to_string_pretty(&lines)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>5} {:>5} {:>9} {:>11}",
        "GPU TYPE", "PODS", "GPUS", "$/H", "SPENT $"
    );
    for l in &lines {
        println!(
            "{:<32} {:>5} {:>5} {:>9.3} {:>11.4}",
            l.gpu_type, l.pods, l.gpus, l.usd_per_hour, l.accrued_usd
        );
    }
    Ok(())
}

/// The plan for the MCP `plan` tool: the same read-only preview as the `plan` command.
struct ConfigPlan(PathBuf);

#[async_trait]
impl PlanSource for ConfigPlan {
    async fn plan(&self) -> std::result::Result<serde_json::Value, String> {
        let (report, synced) = cli::preview(&self.0).await.map_err(|e| format!("{e:#}"))?;
        let mut v = cli::preview_json(&report);
        v["synced"] = serde_json::Value::Bool(synced);
        Ok(v)
    }
}

/// `mcp`: the MCP server on stdin/stdout until the client disconnects.
pub async fn mcp(opts: &Opts) -> Result<()> {
    let (access, settings) = pod_access(opts)?;
    let planner: Option<Arc<dyn PlanSource>> = opts
        .config
        .clone()
        .map(|p| Arc::new(ConfigPlan(p)) as Arc<dyn PlanSource>);
    let transfer = TransferSettings {
        chunk_size: settings.chunk_size,
        ..TransferSettings::default()
    };
    let tools = PodTools::new(access, transfer, planner, settings.allow_terminate);
    mcp::serve_stdio(tools).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_sides_follow_scp() {
        assert_eq!(
            side("abc123:data/x"),
            Side::Pod("abc123".into(), "data/x".into())
        );
        assert_eq!(side("abc123:"), Side::Pod("abc123".into(), ".".into()));
        assert_eq!(side("./a:b"), Side::Local("./a:b".into()));
        assert_eq!(side("/tmp/x"), Side::Local("/tmp/x".into()));
        assert_eq!(side(":x"), Side::Local(":x".into()));
    }

    #[test]
    fn exit_codes_follow_ssh() {
        assert_eq!(exit_code(Some(3)), 3);
        assert_eq!(exit_code(None), 255);
        assert_eq!(exit_code(Some(300)), 255);
    }
}
