//! The checkpoint commands: `agent checkpoint` / `agent resume` (run on a pod by the GPU worker)
//! and the operator's `checkpoint ls | show | gc`. The store comes from `--config FILE` (only its
//! `[checkpoint]` table) and/or `--bucket`/`--prefix`, with endpoint, region and credentials
//! from the configuration or the standard AWS environment.
//!
//! Exit codes: 0 done, 1 failed, 2 invalid input or configuration, 3 nothing to resume,
//! 4 the checkpoint is damaged (a part's hash, a missing object, an unusable manifest).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use runpod_autoscaler::checkpoint::{
    CheckpointError, CheckpointOptions, CheckpointStore, GcOptions, S3Store, TransferOptions,
};
use runpod_autoscaler::config::CheckpointConfig;
use runpod_autoscaler::model::Timestamp;

use crate::{parse_pair, wait_for_signal, Output};

/// Exit code: the job has no complete checkpoint.
const EXIT_NOTHING_TO_RESUME: u8 = 3;
/// Exit code: the checkpoint is damaged.
const EXIT_DAMAGED: u8 = 4;
/// Exit code: invalid input or configuration (as clap's usage errors).
const EXIT_INVALID: u8 = 2;

/// Where the checkpoint store is.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Configuration file; only its `[checkpoint]` table is read.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Bucket (overrides checkpoint.bucket and RUNPOD_AUTOSCALER__CHECKPOINT__BUCKET); with
    /// it no configuration file is needed.
    #[arg(long)]
    bucket: Option<String>,
    /// Key prefix (overrides checkpoint.prefix and RUNPOD_AUTOSCALER__CHECKPOINT__PREFIX).
    #[arg(long)]
    prefix: Option<String>,
}

/// Commands the GPU worker runs on its pod.
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Upload a directory as the job's next checkpoint (continuing this writer's interrupted
    /// upload, if any), then apply retention.
    Checkpoint {
        /// Job id (letters, digits, '.', '_', '-').
        #[arg(long)]
        job: String,
        /// Directory to checkpoint.
        #[arg(long)]
        dir: PathBuf,
        /// Metadata stored in the manifest, repeatable: `--meta step=1200`.
        #[arg(long = "meta", value_parser = parse_pair)]
        meta: Vec<(String, String)>,
        /// Who writes (default: RPA_POD_ID, else the host name).
        #[arg(long, env = "RPA_POD_ID")]
        writer: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Download the job's latest checkpoint into a directory; exit 3 when there is none.
    Resume {
        /// Job id.
        #[arg(long)]
        job: String,
        /// Directory to restore into (created; files it already holds that the checkpoint does
        /// not are left alone).
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Operator commands on the checkpoint store.
#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// List generations (of one job or all): seq, complete or not, size, last change.
    Ls {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show a job's latest manifest (or generation --seq): writer, time, metadata, files.
    Show {
        /// Job id.
        job: String,
        /// A given generation instead of the latest.
        #[arg(long)]
        seq: Option<u64>,
        /// Also read every part back and check its hash (exit 4 when damaged).
        #[arg(long)]
        verify: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete complete generations beyond `keep` per job and abandoned unfinished ones.
    Gc {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Complete generations kept per job (default: checkpoint.keep).
        #[arg(long)]
        keep: Option<usize>,
        /// Unfinished generations older than this are abandoned (default:
        /// checkpoint.abandon_after), e.g. `2h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        abandon_after: Option<Duration>,
        /// Show what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Runs an `agent` command; the exit code says what happened (see the module docs).
pub fn agent(command: AgentCommand) -> ExitCode {
    run(async move {
        match command {
            AgentCommand::Checkpoint {
                job,
                dir,
                meta,
                writer,
                store,
            } => agent_checkpoint(job, dir, meta, writer, store).await,
            AgentCommand::Resume { job, dir, store } => agent_resume(job, dir, store).await,
        }
    })
}

/// Runs a `checkpoint` command.
pub fn operator(command: CheckpointCommand) -> ExitCode {
    run(async move {
        match command {
            CheckpointCommand::Ls { job, output, store } => ls(job, output, store).await,
            CheckpointCommand::Show {
                job,
                seq,
                verify,
                output,
                store,
            } => show(job, seq, verify, output, store).await,
            CheckpointCommand::Gc {
                job,
                keep,
                abandon_after,
                dry_run,
                output,
                store,
            } => {
                let opts = GcOptions {
                    keep,
                    abandon_after,
                    dry_run,
                };
                gc(job, opts, output, store).await
            }
        }
    })
}

fn run(fut: impl std::future::Future<Output = Result<()>>) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(fut));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<runpod_autoscaler::config::ConfigError>()
        .is_some()
    {
        return EXIT_INVALID;
    }
    match e.downcast_ref::<CheckpointError>() {
        Some(CheckpointError::NothingToResume { .. }) => EXIT_NOTHING_TO_RESUME,
        Some(
            CheckpointError::CorruptPart { .. }
            | CheckpointError::MissingObject { .. }
            | CheckpointError::BadManifest { .. },
        ) => EXIT_DAMAGED,
        Some(CheckpointError::InvalidJob { .. } | CheckpointError::InvalidSettings(_)) => {
            EXIT_INVALID
        }
        _ => 1,
    }
}

/// The store `args` describe.
async fn open(args: &StoreArgs) -> Result<S3Store> {
    let loaded = CheckpointConfig::load_section(
        args.config.as_deref(),
        args.bucket.as_deref(),
        args.prefix.as_deref(),
    )?;
    let Some(cfg) = loaded else {
        let why = match &args.config {
            Some(p) => format!("{} has no [checkpoint] table", p.display()),
            None => "no store given".into(),
        };
        return Err(anyhow!(CheckpointError::InvalidSettings(format!(
            "{why}: pass --bucket B (endpoint and credentials from AWS_ENDPOINT_URL, \
             AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or --config FILE with a [checkpoint] \
             table"
        ))));
    };
    cfg.validate()?;
    Ok(S3Store::connect(&cfg).await?)
}

/// Transfer options cancelled by SIGTERM or Ctrl-C (an interrupted upload stays resumable).
fn transfer() -> TransferOptions {
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        token.cancel();
    });
    TransferOptions {
        progress: std::io::stderr().is_terminal(),
        cancel,
        events: None,
    }
}

fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

async fn agent_checkpoint(
    job: String,
    dir: PathBuf,
    meta: Vec<(String, String)>,
    writer: Option<String>,
    args: StoreArgs,
) -> Result<()> {
    let writer = writer
        .filter(|w| !w.trim().is_empty())
        .or_else(host_name)
        .ok_or_else(|| {
            anyhow!(CheckpointError::InvalidSettings(
                "no writer: pass --writer or set RPA_POD_ID".into()
            ))
        })?;
    let store = open(&args).await?;
    let opts = CheckpointOptions {
        writer,
        meta: meta.into_iter().collect::<BTreeMap<_, _>>(),
        transfer: transfer(),
    };
    let out = store
        .checkpoint(&job, &dir, &opts)
        .await
        .with_context(|| format!("checkpointing {} as job {job}", dir.display()))?;
    let m = &out.manifest;
    println!(
        "{}",
        serde_json::json!({
            "event": "checkpoint", "job": m.job, "seq": m.seq, "writer": m.writer,
            "files": m.files.len(), "bytes": m.total_size, "parts": m.chunks.len(),
            "parts_uploaded": out.parts_uploaded, "parts_skipped": out.parts_skipped,
            "resumed_upload": out.resumed_upload, "pruned": out.pruned,
            "location": store.location(),
        })
    );
    Ok(())
}

async fn agent_resume(job: String, dir: PathBuf, args: StoreArgs) -> Result<()> {
    let store = open(&args).await?;
    let m = store
        .resume(&job, &dir, &transfer())
        .await
        .with_context(|| format!("resuming job {job} into {}", dir.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "event": "resumed", "job": m.job, "seq": m.seq, "writer": m.writer,
            "created": m.created.to_string(), "files": m.files.len(), "bytes": m.total_size,
            "meta": m.meta,
        })
    );
    Ok(())
}

fn when(t: Option<Timestamp>) -> String {
    t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

async fn ls(job: Option<String>, output: Output, args: StoreArgs) -> Result<()> {
    let store = open(&args).await?;
    let gens = store
        .list(job.as_deref())
        .await
        .context("listing checkpoints")?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&gens)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>6} {:<10} {:>10} {:<24}",
        "JOB", "SEQ", "STATE", "SIZE", "MODIFIED"
    );
    for g in &gens {
        println!(
            "{:<32} {:>6} {:<10} {:>10} {:<24}",
            g.job,
            g.seq,
            if g.complete { "complete" } else { "unfinished" },
            size(g.bytes),
            when(g.last_modified)
        );
    }
    if gens.is_empty() {
        eprintln!("no checkpoints under {}", store.location());
    }
    Ok(())
}

async fn show(
    job: String,
    seq: Option<u64>,
    verify: bool,
    output: Output,
    args: StoreArgs,
) -> Result<()> {
    let store = open(&args).await?;
    let manifest = match seq {
        Some(s) => store.manifest(&job, s).await?,
        None => store.latest(&job).await?,
    };
    let Some(m) = manifest else {
        let which = seq.map_or("a complete checkpoint".to_owned(), |s| {
            format!("a complete generation {s}")
        });
        return Err(anyhow!(CheckpointError::NothingToResume {
            job: job.clone(),
            location: store.location(),
        }))
        .with_context(|| format!("job {job} has no {which}"));
    };
    if verify {
        store
            .verify(&m)
            .await
            .with_context(|| format!("verifying job {job} generation {}", m.seq))?;
    }
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!("job       {}", m.job);
    println!("seq       {}", m.seq);
    println!("created   {}", m.created);
    println!("writer    {}", m.writer);
    println!(
        "size      {} ({} bytes) in {} parts of {}",
        size(m.total_size),
        m.total_size,
        m.chunks.len(),
        size(m.chunk_size)
    );
    println!("files     {} ({} directories)", m.files.len(), m.dirs.len());
    for (k, v) in &m.meta {
        println!("meta      {k}={v}");
    }
    if verify {
        println!("verified  every part read back and its SHA-256 checked");
    }
    println!();
    println!("{:<64} {:>12} {:>5}  SHA-256", "PATH", "SIZE", "MODE");
    for f in &m.files {
        println!("{:<64} {:>12} {:>5o}  {}", f.path, f.size, f.mode, f.sha256);
    }
    Ok(())
}

async fn gc(job: Option<String>, opts: GcOptions, output: Output, args: StoreArgs) -> Result<()> {
    let store = open(&args).await?;
    let report = store
        .gc(job.as_deref(), &opts)
        .await
        .context("collecting checkpoints")?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for r in &report.removed {
        println!(
            "{verb} {} generation {} ({}, {})",
            r.job,
            r.seq,
            match r.reason {
                runpod_autoscaler::checkpoint::GcReason::Retention => "retention",
                runpod_autoscaler::checkpoint::GcReason::Abandoned => "abandoned",
            },
            size(r.bytes)
        );
    }
    let freed: u64 = report.removed.iter().map(|r| r.bytes).sum();
    println!(
        "{verb} {} generations ({}), {} uploads aborted",
        report.removed.len(),
        size(freed),
        report.uploads_aborted
    );
    Ok(())
}
