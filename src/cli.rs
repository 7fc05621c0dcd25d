//! The `gpus` and `pods` commands: thin operator views over [`CloudProvider`], against RunPod or
//! the emulator (URLs and key from `RUNPOD_API_URL`, `RUNPOD_GRAPHQL_URL`, `RUNPOD_API_KEY` or
//! the `[runpod]` table of a config file).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

use runpod_autoscaler::clock::{Clock, SystemClock};
use std::sync::Arc;

use runpod_autoscaler::config::{Config, ReconcileConfig, RunPodConfig};
use runpod_autoscaler::decide::{Sample, Series, Signals};
use runpod_autoscaler::join::pod::NoShell;
use runpod_autoscaler::model::SignalKind;
use runpod_autoscaler::model::{PodId, Usd};
use runpod_autoscaler::provider::runpod::{RunPodClient, RunPodSettings};
use runpod_autoscaler::provider::CloudProvider;
use runpod_autoscaler::reconcile::claims::{MemoryClaims, RedbClaims};
use runpod_autoscaler::reconcile::{
    Context as ReconcileContext, ReconcileSettings, Reconciler, TickReport,
};
use runpod_autoscaler::service;
use runpod_autoscaler::telemetry::Metrics;

/// The RunPod client the `[runpod]` table (and environment) describes; an API key is required.
pub fn client(config: Option<&Path>) -> Result<RunPodClient> {
    let c = RunPodConfig::load_section(config)?;
    if c.api_key.as_ref().is_none_or(|k| k.is_empty()) {
        bail!("no RunPod API key: set RUNPOD_API_KEY or runpod.api_key in the config file");
    }
    Ok(RunPodClient::new(RunPodSettings::from_config(&c))?)
}

fn price(p: Option<Usd>) -> String {
    p.map(|u| format!("{:.2}", u.dollars()))
        .unwrap_or_else(|| "-".into())
}

/// `gpus`: GPU types, memory, on-demand and spot prices, stock.
pub async fn gpus(config: Option<&Path>, json: bool) -> Result<()> {
    let offers = client(config)?
        .offerings()
        .await
        .context("reading the GPU catalog")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&offers)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>5} {:>8} {:>9} {:>10} {:>10} {:>7}",
        "GPU TYPE", "GB", "SECURE", "COMMUNITY", "SPOT SEC", "SPOT COM", "STOCK"
    );
    for o in &offers {
        println!(
            "{:<32} {:>5} {:>8} {:>9} {:>10} {:>10} {:>7}",
            o.gpu_type.as_str(),
            o.memory_gb,
            price(o.secure_usd),
            price(o.community_usd),
            price(o.secure_spot_usd),
            price(o.community_spot_usd),
            o.stock.as_str()
        );
    }
    Ok(())
}

/// `pods list`: our pods with slot, state, join state, health, age, $/h and SSH endpoint. Slots
/// and join state come from the claim store (`reconcile.state_dir`, read while the service runs);
/// health from the running service (`--service`).
pub async fn pods_list(config: Option<&Path>, service: Option<&str>, json: bool) -> Result<()> {
    let client = client(config)?;
    let pods = client.list().await.context("listing pods")?;
    // Spend so far per pod; the listing stands without it.
    let billed = match client.billing(None).await {
        Ok(b) => Some(b.per_pod),
        Err(e) => {
            eprintln!("warning: billing not read ({e}); SPENT shows -");
            None
        }
    };
    let claims = match config {
        Some(path) => {
            let dir = ReconcileConfig::load_section(path)?.state_dir;
            if RedbClaims::file(&dir).exists() {
                RedbClaims::read(&dir).context("reading the claim store (reconcile.state_dir)")?
            } else {
                Vec::new()
            }
        }
        None => Vec::new(),
    };
    let fleet: Vec<serde_json::Value> = match service {
        Some(url) => {
            let url = format!("{}/debug/plan", url.trim_end_matches('/'));
            let plan: serde_json::Value = reqwest::get(&url)
                .await
                .and_then(|r| r.error_for_status())
                .with_context(|| format!("reading {url}"))?
                .json()
                .await
                .with_context(|| format!("reading {url}"))?;
            plan["fleet"].as_array().cloned().unwrap_or_default()
        }
        None => Vec::new(),
    };
    let rows: Vec<PodRow> = pods
        .iter()
        .map(|p| {
            let claim = claims.iter().find(|c| c.pod.as_ref() == Some(&p.id));
            let entry = fleet
                .iter()
                .find(|e| e["pod"].as_str() == Some(p.id.as_str()));
            PodRow {
                accrued_usd: billed
                    .as_ref()
                    .map(|b| b.get(p.id.as_str()).copied().unwrap_or(0.0)),
                pod: p.clone(),
                slot: claim.map(|c| format!("{}-{}", c.key.slot, c.key.generation)),
                join: claim.map(|c| if c.joined { "joined" } else { "pending" }.to_owned()),
                health: entry.map(|e| {
                    if !e["retiring"].is_null() {
                        "retiring".to_owned()
                    } else if e["ready"].as_bool() == Some(true) {
                        "ready".to_owned()
                    } else {
                        "not ready".to_owned()
                    }
                }),
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let now = SystemClock.now();
    println!(
        "{:<16} {:<24} {:<6} {:<13} {:<8} {:<9} {:>8} {:>7} {:>8} SSH",
        "ID", "NAME", "SLOT", "STATE", "JOIN", "HEALTH", "AGE", "$/H", "SPENT"
    );
    for r in &rows {
        let p = &r.pod;
        let age = p
            .created_at
            .map(|t| {
                humantime::format_duration(std::time::Duration::from_secs(
                    now.saturating_since(t).as_secs(),
                ))
                .to_string()
            })
            .unwrap_or_else(|| "-".into());
        let ssh = p
            .ssh
            .as_ref()
            .map(|s| format!("{}@{}:{}", s.username, s.host, s.port))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:<24} {:<6} {:<13} {:<8} {:<9} {:>8} {:>7.2} {:>8} {}",
            p.id.as_str(),
            p.name,
            r.slot.as_deref().unwrap_or("-"),
            p.state.as_str(),
            r.join.as_deref().unwrap_or("-"),
            r.health.as_deref().unwrap_or("-"),
            age,
            p.usd_per_hour.dollars(),
            r.accrued_usd
                .map(|a| format!("{a:.4}"))
                .unwrap_or_else(|| "-".into()),
            ssh
        );
    }
    Ok(())
}

/// One line of `pods list`.
#[derive(serde::Serialize)]
struct PodRow {
    #[serde(flatten)]
    pod: runpod_autoscaler::provider::Pod,
    /// `slot-generation` of its claim.
    slot: Option<String>,
    /// `joined` or `pending`, from its claim.
    join: Option<String>,
    /// `ready`, `not ready` or `retiring`, from the running service.
    health: Option<String>,
    /// Billed so far (USD), when billing could be read.
    accrued_usd: Option<f64>,
}

/// One observation of RunPod, the claims and the signals, and the plan a tick would carry out
/// now (nothing executed, the claim store only read); also whether RunPod could be listed.
pub async fn preview(config_path: &Path) -> Result<(TickReport, bool)> {
    let config =
        Config::load(config_path).with_context(|| format!("loading {}", config_path.display()))?;
    let now = SystemClock.now();
    let policy = config.planner_policy();
    let sources = service::sources_from_config(&config)
        .context("creating the signal sources (signals.queue / signals.latency)")?;
    // Samples a generous hour back would be stale; one fresh sample each is what a tick sees.
    let retention = std::time::Duration::from_secs(3600);
    let mut queue = Series::new(config.signals.poll_interval, retention);
    let mut latency = config
        .signals
        .latency
        .as_ref()
        .map(|_| Series::new(config.signals.poll_interval, retention));
    for source in &sources {
        match source.sample().await {
            Ok(r) => {
                let sample = Sample {
                    value: r.value,
                    observed_at: now,
                    max_workers: r.max_workers,
                };
                match source.kind() {
                    SignalKind::QueueLag => queue.push(sample),
                    SignalKind::LatencyP95 => latency.as_mut().is_some_and(|l| l.push(sample)),
                };
            }
            Err(e) => eprintln!(
                "warning: {} not read ({e}); the plan holds on it",
                source.kind().describe()
            ),
        }
    }
    let signals = Signals { queue, latency };
    let state_dir = &config.reconcile.state_dir;
    let claims = if RedbClaims::file(state_dir).exists() {
        RedbClaims::read(state_dir).context("reading the claim store (reconcile.state_dir)")?
    } else {
        Vec::new()
    };
    let api_key = config.runpod.api_key.clone().unwrap_or_default();
    if api_key.is_empty() {
        bail!("no RunPod API key: set RUNPOD_API_KEY or runpod.api_key");
    }
    let provider = RunPodClient::new(RunPodSettings::from_config(&config.runpod))?;
    let ctx = Arc::new(ReconcileContext {
        provider: Arc::new(provider),
        shell: Arc::new(NoShell),
        claims: Arc::new(MemoryClaims::new(claims)),
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        checkpoints: None,
        settings: ReconcileSettings::from_config(&config, String::new(), None),
    });
    let mut reconciler = Reconciler::new(ctx).context("reading the claims")?;
    let report = reconciler.preview(&signals, &policy).await;
    let synced = reconciler.is_synced();
    Ok((report, synced))
}

/// The preview as JSON: plan, fleet, errors, and the plan as text.
pub fn preview_json(report: &TickReport) -> serde_json::Value {
    serde_json::json!({
        "plan": report.plan,
        "fleet": report.fleet,
        "errors": report.errors,
        "text": report.plan.to_string(),
    })
}

/// `plan`: one observation of RunPod, the claims and the signals, and the plan a tick would
/// carry out now. Nothing is executed and the claim store is only read.
pub async fn plan(config_path: &Path, json: bool) -> Result<()> {
    let (report, synced) = preview(config_path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&preview_json(&report))?);
    } else {
        print!("{}", report.plan);
        for e in &report.fleet {
            println!(
                "  pod {} slot {} {} join {} {}",
                e.pod.as_ref().map_or("-", |p| p.as_str()),
                e.claim
                    .map_or("-".to_owned(), |k| format!("{}-{}", k.slot, k.generation)),
                e.state,
                e.join.as_ref().map_or("-".to_owned(), |j| format!("{j:?}")),
                if e.ready { "ready" } else { "" }
            );
        }
        for e in &report.errors {
            eprintln!("warning: {e}");
        }
    }
    if !synced {
        bail!("RunPod could not be listed; the plan above holds everything");
    }
    Ok(())
}

/// `pods terminate ID | --all-owned`: asks on a terminal unless `--yes`; refuses without
/// `--yes` when stdin is not a terminal. One ID is looked up first: a pod without our owner
/// marker is refused unless `--force`; a pod already gone is reported and left alone.
pub async fn pods_terminate(
    config: Option<&Path>,
    id: Option<String>,
    all_owned: bool,
    yes: bool,
    force: bool,
) -> Result<()> {
    let client = client(config)?;
    let ids: Vec<PodId> = if all_owned {
        client
            .list()
            .await
            .context("listing pods")?
            .into_iter()
            .map(|p| p.id)
            .collect()
    } else {
        let Some(id) = id.map(PodId) else {
            bail!("give a pod id or --all-owned");
        };
        let Some(pod) = client
            .get(&id)
            .await
            .with_context(|| format!("looking up {id}"))?
        else {
            println!("{id} is already gone; nothing to terminate");
            return Ok(());
        };
        if let Some(why) = client.owner().why_not_owned(&pod.name, &pod.env) {
            if !force {
                bail!(
                    "refusing to terminate {id}: it is not owned by this autoscaler ({why}); \
                     pass --force to terminate it anyway"
                );
            }
            eprintln!("warning: {id} is not owned by this autoscaler ({why}); terminating it because of --force");
        }
        vec![id]
    };
    if ids.is_empty() {
        println!("no pods to terminate");
        return Ok(());
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to terminate {} pod(s) without --yes: stdin is not a terminal",
                ids.len()
            );
        }
        let list = ids
            .iter()
            .map(|i| i.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        eprint!("Terminate {} pod(s): {list}? [y/N] ", ids.len());
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("aborted; nothing terminated");
        }
    }
    for id in &ids {
        client
            .terminate(id)
            .await
            .with_context(|| format!("terminating {id}"))?;
        println!("terminated {id}");
    }
    Ok(())
}
