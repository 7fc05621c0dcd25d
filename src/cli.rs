//! The `gpus` and `pods` commands: thin operator views over [`CloudProvider`], against RunPod or
//! the emulator (URLs and key from `RUNPOD_API_URL`, `RUNPOD_GRAPHQL_URL`, `RUNPOD_API_KEY` or
//! the `[runpod]` table of a config file).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

use runpod_autoscaler::clock::{Clock, SystemClock};
use runpod_autoscaler::config::RunPodConfig;
use runpod_autoscaler::model::{PodId, Usd};
use runpod_autoscaler::provider::runpod::{RunPodClient, RunPodSettings};
use runpod_autoscaler::provider::CloudProvider;

fn client(config: Option<&Path>) -> Result<RunPodClient> {
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

/// `pods list`: our pods with state, age, $/h and SSH endpoint.
pub async fn pods_list(config: Option<&Path>, json: bool) -> Result<()> {
    let pods = client(config)?.list().await.context("listing pods")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&pods)?);
        return Ok(());
    }
    let now = SystemClock.now();
    println!(
        "{:<16} {:<28} {:<13} {:>8} {:>7} SSH",
        "ID", "NAME", "STATE", "AGE", "$/H"
    );
    for p in &pods {
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
            "{:<16} {:<28} {:<13} {:>8} {:>7.2} {}",
            p.id.as_str(),
            p.name,
            p.state.as_str(),
            age,
            p.usd_per_hour.dollars(),
            ssh
        );
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
