//! The `runpod-autoscaler` binary: thin command-line edge over the library. Errors here carry
//! context for the operator (`anyhow`); the library's errors are typed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::info;

mod access_cli;
mod checkpoint_cli;
mod cli;

use runpod_autoscaler::checkpoint::S3Store;
use runpod_autoscaler::clock::SystemClock;
use runpod_autoscaler::config::{public_key_path, Config, JoinMode, LogFormat, Mode};
use runpod_autoscaler::decide::PolicyKind;
use runpod_autoscaler::join::pod::SshShell;
use runpod_autoscaler::join::SshKey;
use runpod_autoscaler::model::Secret;
use runpod_autoscaler::proto::external_scaler_client::ExternalScalerClient;
use runpod_autoscaler::proto::{GetMetricsRequest, ScaledObjectRef};
use runpod_autoscaler::provider::runpod::{RunPodClient, RunPodSettings};
use runpod_autoscaler::reconcile::claims::RedbClaims;
use runpod_autoscaler::reconcile::{
    CheckpointCheck, Context as ReconcileContext, ReconcileSettings, Reconciler, StoreCheck,
};
use runpod_autoscaler::scaler::TlsMaterial;
use runpod_autoscaler::service::{self, ServiceParts};
use runpod_autoscaler::simulate::{self, Extras, SimParams, TimelineWriter, Trace};
use runpod_autoscaler::telemetry::Metrics;

#[derive(Parser)]
#[command(
    name = "runpod-autoscaler",
    version,
    about = "KEDA external scaler and RunPod burst autoscaler for GPU work"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: KEDA gRPC scaler, HTTP metrics/health, and the tick loop.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// gRPC listen address (overrides service.grpc_addr).
        #[arg(long)]
        grpc_addr: Option<SocketAddr>,
        /// HTTP listen address (overrides service.http_addr).
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
    /// Validate a configuration file: exit 0 when valid, 2 with the problem when not.
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Replay demand traces through the planner and compare policies.
    Simulate {
        /// CSV trace(s): `time_s,arriving_jobs[,p95_s]`.
        #[arg(long = "trace", required = true)]
        traces: Vec<PathBuf>,
        /// Which policy to run.
        #[arg(long, value_enum, default_value_t = PolicyChoice::All)]
        policy: PolicyChoice,
        /// Take policy limits and baseline from this configuration (else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Also write each replay's per-tick timeline to this CSV file: what the planner saw
        /// (backlog, p95, violated), what it did (launched, terminated, pods) and what it cost.
        #[arg(long, value_name = "CSV")]
        timeline: Option<PathBuf>,
        /// Skip the clairvoyant lower bound (a linear program: seconds on a week-long trace,
        /// where the replays take milliseconds); the table then has no `$ / bound`.
        #[arg(long)]
        no_bound: bool,
    },
    /// Run the RunPod API emulator (REST v2 + GraphQL subset, sshd-backed pods, faults).
    #[cfg(feature = "emulator")]
    Emulator {
        /// Listen address (port 0 picks a free one; the chosen address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Accepted API key (added to the config's `api_keys`).
        #[arg(long, env = "RUNPOD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Emulator configuration (TOML: catalog, boot delay, faults); defaults without it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// GPU types with memory, on-demand and spot prices, and stock.
    Gpus {
        /// Configuration file (only its `[runpod]` table is read).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Observe RunPod and the signals and print the plan a tick would carry out now; nothing is
    /// executed (a dry run of active mode, also useful in advisory mode).
    Plan {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Pods this autoscaler owns.
    Pods {
        #[command(subcommand)]
        command: PodsCommand,
    },
    /// Run a command on a pod (or every pod with --all) over pooled SSH; exits with its status.
    Exec {
        /// The pod id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        pod: Option<String>,
        /// Every owned RUNNING pod at once, output lines prefixed with `[pod] `.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        access: AccessArgs,
        /// The command (after `--`), run by the pod's shell in its home.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy files between this machine and a pod (`POD:PATH` on one side): chunked, each chunk
    /// SHA-256 checked on the receiving side, resumable, free space checked first.
    Cp {
        /// Source: a local path or `POD:PATH`.
        src: String,
        /// Destination: a local path or `POD:PATH`.
        dst: String,
        /// Chunk size (e.g. 8MiB; default access.chunk_size).
        #[arg(long, value_parser = parse_chunk)]
        chunk_size: Option<u64>,
        #[command(flatten)]
        access: AccessArgs,
        /// Output format (json: a summary with hashes and chunk counts).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Our pods' $/h now and spend so far, totalled by GPU type.
    Cost {
        /// Configuration file (only its `[runpod]` table is read).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Serve the Model Context Protocol on stdin/stdout: pod tools for AI agents.
    Mcp {
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Run on a pod by the GPU worker: checkpoint a job's directory to the store, or resume
    /// the latest checkpoint (exit 3: nothing to resume).
    Agent {
        #[command(subcommand)]
        command: checkpoint_cli::AgentCommand,
    },
    /// The checkpoint store: list generations, show a manifest, garbage-collect.
    Checkpoint {
        #[command(subcommand)]
        command: checkpoint_cli::CheckpointCommand,
    },
    /// Call the scaler like KEDA does (GetMetricSpec, GetMetrics, IsActive) and print answers.
    ScalerProbe {
        /// Scaler address, e.g. http://127.0.0.1:9090.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        addr: String,
        /// Trigger metadata, repeatable: `-m targetSize=2`.
        #[arg(long = "metadata", short = 'm', value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
    },
}

/// Where `exec`, `cp`, `pods watch` and `mcp` get API settings and the SSH key.
#[derive(clap::Args)]
struct AccessArgs {
    /// Configuration file (`[runpod]`, `[access]`, `reconcile.ssh_key_file`,
    /// `reconcile.ssh_host_keys`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// SSH private key (default: reconcile.ssh_key_file of the config).
    #[arg(long, short = 'i')]
    identity: Option<PathBuf>,
}

impl AccessArgs {
    fn opts(self) -> access_cli::Opts {
        access_cli::Opts {
            config: self.config,
            identity: self.identity,
        }
    }
}

fn parse_chunk(s: &str) -> Result<u64, String> {
    runpod_autoscaler::access::transfer::parse_size(s)
}

#[derive(Subcommand)]
enum PodsCommand {
    /// List our pods: state, age, $/h, SSH endpoint.
    List {
        /// Configuration file (its `[runpod]` table, and `reconcile.state_dir` for slots and
        /// join state).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The running service's HTTP address (e.g. http://127.0.0.1:8080): adds health.
        #[arg(long)]
        service: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Watch our pods: online/offline transitions (provider state and an SSH probe) and GPU
    /// utilization, one line per event, until interrupted.
    Watch {
        /// Poll period (default access.watch_interval, 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<std::time::Duration>,
        #[command(flatten)]
        access: AccessArgs,
        /// Output format (json: one object per line).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Terminate one pod, or every pod we own. Asks first unless --yes.
    Terminate {
        /// The pod id.
        #[arg(required_unless_present = "all_owned", conflicts_with = "all_owned")]
        id: Option<String>,
        /// Every pod this autoscaler owns.
        #[arg(long)]
        all_owned: bool,
        /// Do not ask (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        /// Terminate the pod even if it lacks our owner marker (name prefix and RPA_OWNER).
        #[arg(long, conflicts_with = "all_owned")]
        force: bool,
        /// Configuration file (only its `[runpod]` table is read).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyChoice {
    Seed,
    Target,
    Cost,
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { file } => return check_config(&file),
        Command::Agent { command } => return checkpoint_cli::agent(command),
        Command::Checkpoint { command } => return checkpoint_cli::operator(command),
        Command::Serve {
            config,
            grpc_addr,
            http_addr,
        } => runtime().and_then(|rt| rt.block_on(serve(&config, grpc_addr, http_addr))),
        Command::Simulate {
            traces,
            policy,
            config,
            output,
            timeline,
            no_bound,
        } => run_simulation(
            &traces,
            policy,
            config.as_deref(),
            output,
            timeline.as_deref(),
            !no_bound,
        ),
        #[cfg(feature = "emulator")]
        Command::Emulator {
            listen,
            api_key,
            config,
        } => runtime().and_then(|rt| rt.block_on(run_emulator(listen, api_key, config))),
        Command::Gpus { config, output } => runtime()
            .and_then(|rt| rt.block_on(cli::gpus(config.as_deref(), output == Output::Json))),
        Command::Pods { command } => runtime().and_then(|rt| {
            rt.block_on(async move {
                match command {
                    PodsCommand::List {
                        config,
                        service,
                        output,
                    } => {
                        cli::pods_list(
                            config.as_deref(),
                            service.as_deref(),
                            output == Output::Json,
                        )
                        .await
                    }
                    PodsCommand::Terminate {
                        id,
                        all_owned,
                        yes,
                        force,
                        config,
                    } => cli::pods_terminate(config.as_deref(), id, all_owned, yes, force).await,
                    PodsCommand::Watch {
                        interval,
                        access,
                        output,
                    } => access_cli::watch(&access.opts(), interval, output == Output::Json).await,
                }
            })
        }),
        Command::Exec {
            pod,
            all,
            access,
            command,
        } => {
            return match runtime()
                .and_then(|rt| rt.block_on(access_cli::exec(&access.opts(), pod, all, &command)))
            {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(255)
                }
            }
        }
        Command::Cp {
            src,
            dst,
            chunk_size,
            access,
            output,
        } => runtime().and_then(|rt| {
            rt.block_on(access_cli::cp(
                &access.opts(),
                &src,
                &dst,
                chunk_size,
                output == Output::Json,
            ))
        }),
        Command::Cost { config, output } => runtime().and_then(|rt| {
            rt.block_on(access_cli::cost(config.as_deref(), output == Output::Json))
        }),
        Command::Mcp { access } => {
            // stdout carries the protocol: logs go to stderr, quiet unless RUST_LOG asks.
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .init();
            runtime().and_then(|rt| rt.block_on(access_cli::mcp(&access.opts())))
        }
        Command::Plan { config, output } => {
            runtime().and_then(|rt| rt.block_on(cli::plan(&config, output == Output::Json)))
        }
        Command::ScalerProbe { addr, metadata } => {
            runtime().and_then(|rt| rt.block_on(probe(addr, metadata)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn check_config(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            match &c.baseline.terraform_output {
                Some(tf) => println!(
                    "{}: valid (baseline: {} GPUs from {})",
                    file.display(),
                    c.baseline.gpus,
                    tf.display()
                ),
                None => println!("{}: valid", file.display()),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(
    path: &Path,
    grpc_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
) -> Result<()> {
    let mut config = Config::load(path).with_context(|| format!("loading {}", path.display()))?;
    if let Some(a) = grpc_addr {
        config.service.grpc_addr = a;
    }
    if let Some(a) = http_addr {
        config.service.http_addr = a;
    }
    init_logging(config.service.log_format);

    let tls = match &config.service.tls {
        None => None,
        Some(t) => Some(TlsMaterial {
            cert_pem: read(&t.cert_file, "service.tls.cert_file")?,
            key_pem: read(&t.key_file, "service.tls.key_file")?,
            client_ca_pem: t
                .client_ca_file
                .as_deref()
                .map(|p| read(p, "service.tls.client_ca_file"))
                .transpose()?,
        }),
    };
    let grpc = tokio::net::TcpListener::bind(config.service.grpc_addr)
        .await
        .with_context(|| {
            format!(
                "binding gRPC to {} (service.grpc_addr)",
                config.service.grpc_addr
            )
        })?;
    let http = tokio::net::TcpListener::bind(config.service.http_addr)
        .await
        .with_context(|| {
            format!(
                "binding HTTP to {} (service.http_addr)",
                config.service.http_addr
            )
        })?;

    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let reconciler = match config.reconcile.mode {
        Mode::Advisory => None,
        Mode::Active => Some(reconciler(&config, metrics.clone(), shutdown.clone()).await?),
    };
    let running = service::start(
        ServiceParts {
            grpc,
            http,
            tls,
            sources: service::sources_from_config(&config)
                .context("creating the signal sources (signals.queue / signals.latency)")?,
            poll_interval: config.signals.poll_interval,
            tick_interval: config.service.tick_interval,
            baseline_gpus: config.baseline.gpus,
            policy: config.planner_policy(),
            clock: Arc::new(SystemClock),
            metrics: metrics.clone(),
            reconciler,
        },
        shutdown.clone(),
    )?;
    // One machine-readable line on stdout so scripts and tests can find the ports.
    println!(
        "{}",
        serde_json::json!({"event": "listening", "grpc": running.grpc_addr, "http": running.http_addr})
    );
    info!(grpc = %running.grpc_addr, http = %running.http_addr, policy = %config.policy.kind, "serving");

    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown requested; finishing the current tick");
        signal_token.cancel();
    });
    running
        .wait()
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .context("service failed")?;
    info!("stopped");
    Ok(())
}

/// The reconciler a configuration in active mode describes: the RunPod client, SSH with the
/// configured key, and the claim store in `reconcile.state_dir`.
async fn reconciler(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<Reconciler> {
    let r = &config.reconcile;
    let key_file = r
        .ssh_key_file
        .as_deref()
        .context("reconcile.ssh_key_file is required in active mode")?;
    let key = SshKey::load(key_file).context("loading reconcile.ssh_key_file")?;
    let public_file = public_key_path(key_file);
    let public_key = std::fs::read_to_string(&public_file)
        .with_context(|| {
            format!(
                "reading {} (the public half of reconcile.ssh_key_file)",
                public_file.display()
            )
        })?
        .trim()
        .to_owned();
    let shell = if r.ssh_host_keys.is_empty() {
        SshShell::trust_on_first_use(key)
    } else {
        SshShell::pinned(key, r.ssh_host_keys.clone())
    };
    let token = match (&config.join.mode, &config.join.kubernetes_token_file) {
        (JoinMode::Kubernetes, Some(path)) => Some(Secret::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading join.kubernetes_token_file {}", path.display()))?
                .trim()
                .to_owned(),
        )),
        _ => None,
    };
    let claims =
        RedbClaims::open(&r.state_dir).context("opening the claim store (reconcile.state_dir)")?;
    let provider = RunPodClient::new(RunPodSettings::from_config(&config.runpod))
        .context("creating the RunPod client")?
        .with_shutdown(shutdown);
    let checkpoints: Option<Arc<dyn CheckpointCheck>> = match &config.checkpoint {
        Some(c) => {
            let store = S3Store::connect(c)
                .await
                .context("connecting to the checkpoint store ([checkpoint])")?;
            Some(Arc::new(StoreCheck::new(Arc::new(store))))
        }
        None => None,
    };
    let ctx = Arc::new(ReconcileContext {
        provider: Arc::new(provider),
        shell: Arc::new(shell),
        claims: Arc::new(claims),
        clock: Arc::new(SystemClock),
        metrics,
        checkpoints,
        settings: ReconcileSettings::from_config(config, public_key, token),
    });
    Reconciler::new(ctx).context("reading the claim store")
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {} ({key})", path.display()))
}

fn run_simulation(
    traces: &[PathBuf],
    choice: PolicyChoice,
    config: Option<&Path>,
    output: Output,
    timeline: Option<&Path>,
    with_bound: bool,
) -> Result<()> {
    let (base_policy, baseline_gpus) = match config {
        Some(path) => {
            let c = Config::load(path).with_context(|| format!("loading {}", path.display()))?;
            (c.planner_policy(), c.baseline.gpus)
        }
        None => (
            simulate::default_policy(),
            SimParams::default().baseline_gpus,
        ),
    };
    let kinds: Vec<PolicyKind> = match choice {
        PolicyChoice::Seed => vec![PolicyKind::Seed],
        PolicyChoice::Target => vec![PolicyKind::Target],
        PolicyChoice::Cost => vec![PolicyKind::Cost],
        PolicyChoice::All => PolicyKind::ALL.to_vec(),
    };
    let params = SimParams {
        baseline_gpus,
        ..SimParams::default()
    };
    // The timeline file is created before any replay, so a path that cannot be written fails
    // at once instead of after the bounds are solved.
    let writing = |p: &Path| format!("writing the timeline to {}", p.display());
    let mut timeline_out = match timeline {
        Some(p) => Some((
            p,
            TimelineWriter::new(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| writing(p))?,
            )),
        )),
        None => None,
    };
    let mut results = Vec::new();
    for path in traces {
        let trace =
            Trace::from_path(path).with_context(|| format!("reading trace {}", path.display()))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let extras = Extras {
            bound: with_bound,
            timelines: timeline_out.is_some(),
        };
        let mut comparison =
            simulate::compare(&name, &trace, &base_policy, &kinds, &params, extras);
        if let Some((p, out)) = timeline_out.as_mut() {
            // Written trace by trace, so only one trace's timelines are ever held.
            for (kind, ticks) in kinds.iter().zip(std::mem::take(&mut comparison.timelines)) {
                out.write(&name, *kind, &ticks)
                    .with_context(|| writing(p))?;
            }
        }
        results.push(comparison);
    }
    if let Some((p, out)) = timeline_out {
        out.finish().with_context(|| writing(p))?;
    }
    match output {
        Output::Text => print!("{}", simulate::render_table(&results)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&results)?),
    }
    Ok(())
}

async fn probe(addr: String, metadata: Vec<(String, String)>) -> Result<()> {
    let mut client = ExternalScalerClient::connect(addr.clone())
        .await
        .with_context(|| format!("connecting to the scaler at {addr}"))?;
    let object = ScaledObjectRef {
        name: "probe".into(),
        namespace: "default".into(),
        scaler_metadata: metadata.into_iter().collect::<HashMap<_, _>>(),
    };
    let spec = client
        .get_metric_spec(object.clone())
        .await
        .context("GetMetricSpec")?
        .into_inner();
    let Some(first) = spec.metric_specs.first() else {
        bail!("GetMetricSpec returned no metric spec");
    };
    println!(
        "GetMetricSpec: metricName={} targetSize={} targetSizeFloat={}",
        first.metric_name, first.target_size, first.target_size_float
    );
    let metrics = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object.clone()),
            metric_name: first.metric_name.clone(),
        })
        .await
        .context("GetMetrics")?
        .into_inner();
    for v in &metrics.metric_values {
        println!(
            "GetMetrics:    metricName={} metricValue={} metricValueFloat={}",
            v.metric_name, v.metric_value, v.metric_value_float
        );
    }
    let active = client
        .is_active(object)
        .await
        .context("IsActive")?
        .into_inner();
    println!("IsActive:      result={}", active.result);
    Ok(())
}

#[cfg(feature = "emulator")]
async fn run_emulator(
    listen: SocketAddr,
    api_key: Option<String>,
    config: Option<PathBuf>,
) -> Result<()> {
    use runpod_autoscaler::emulator::{EmulatorConfig, RunningEmulator};
    init_logging(LogFormat::Text);
    let mut cfg = match &config {
        Some(path) => EmulatorConfig::load(path)?,
        None => EmulatorConfig::default(),
    };
    if let Some(k) = api_key.filter(|k| !k.is_empty()) {
        cfg.api_keys.push(Secret::new(k));
    }
    if cfg.api_keys.is_empty() {
        bail!("no API key: pass --api-key KEY (or RUNPOD_API_KEY), or set api_keys in the emulator config");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the emulator to {listen}"))?;
    let emulator = RunningEmulator::start(listener, cfg, Arc::new(SystemClock)).await?;
    println!(
        "{}",
        serde_json::json!({"event": "listening", "addr": emulator.addr(),
            "api_url": emulator.api_url(), "graphql_url": emulator.graphql_url()})
    );
    info!(addr = %emulator.addr(), "RunPod emulator serving");
    let token = CancellationToken::new();
    let signal_token = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal_token.cancel();
    });
    // Kills every pod's sshd before returning.
    emulator.serve_until(token).await;
    info!("emulator stopped");
    Ok(())
}
