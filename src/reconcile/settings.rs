//! The reconciler's settings, and how a configuration becomes them.

use std::collections::BTreeMap;
use std::time::Duration;

use super::claims::ClaimTiming;
use crate::config::{Config, JoinMode, KubeTemplate, QueueSourceConfig};
use crate::decide::offers::OfferSpec;
use crate::join::pod::{JoinPlan, KubeJoin, HEALTH_QUERY};
use crate::model::{Cloud, GpuTypeId, Secret, Usd};

/// Everything that steers the reconciler besides the planner's policy.
#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// GPU workers of the local baseline (the planner covers demand with them first).
    pub baseline_gpus: u32,
    /// Cluster id: part of every pod name (`<prefix><cluster>-<slot>-<generation>`).
    pub cluster: String,
    /// The provider's owner prefix of pod names.
    pub name_prefix: String,
    /// Container image of new pods.
    pub image: String,
    /// Container disk (GB).
    pub disk_gb: u32,
    /// Extra environment of new pods.
    pub env: BTreeMap<String, String>,
    /// OpenSSH public key injected as `PUBLIC_KEY` (the reconciler logs in with its private half).
    pub public_key: String,
    /// Acceptable offers, in order of preference at equal price.
    pub offers: Vec<OfferSpec>,
    /// Listing-lag and orphan timing.
    pub timing: ClaimTiming,
    /// How long a capacity error keeps a market aside.
    pub unavailable_ttl: Duration,
    /// How often the market (prices, stock) is read again.
    pub quotes_refresh: Duration,
    /// What joining means.
    pub join: JoinPlan,
    /// The health command (GPU query).
    pub health_command: String,
    /// An idle probe instead of GPU utilization: exit 0 = idle.
    pub idle_command: Option<String>,
    /// The drain command (`None`: the worker-mode drain file).
    pub drain_command: Option<String>,
    /// Every SSH command's bound.
    pub ssh_timeout: Duration,
    /// Every provider call's bound.
    pub provider_timeout: Duration,
    /// Health probe period.
    pub health_interval: Duration,
    /// Probes failing this long: the pod is dead, preempted or unreachable and is replaced.
    pub unhealthy_after: Duration,
    /// A GPU at or above this utilization (percent) is busy.
    pub busy_utilization: f64,
    /// Longest wait for a draining pod to go idle before it is terminated anyway.
    pub drain_timeout: Duration,
    /// Pods older than this are replaced (drained first).
    pub max_pod_lifetime: Option<Duration>,
}

impl ReconcileSettings {
    /// The settings a configuration describes. `public_key` is the OpenSSH public key injected
    /// into pods; `join_token` the Kubernetes join token (kubernetes mode).
    pub fn from_config(c: &Config, public_key: String, join_token: Option<Secret>) -> Self {
        let r = &c.reconcile;
        let offers = if c.offers.is_empty() {
            vec![OfferSpec {
                gpu_type: GpuTypeId(c.policy.gpu_type.clone()),
                gpus_per_pod: c.policy.gpus_per_pod,
                cloud: Cloud::Secure,
                data_centers: Vec::new(),
                max_bid_per_gpu: None,
                throughput: 1.0,
            }]
        } else {
            c.offers
                .iter()
                .map(|o| OfferSpec {
                    gpu_type: GpuTypeId(o.gpu_type.clone()),
                    gpus_per_pod: o.gpus_per_pod,
                    cloud: o.cloud,
                    data_centers: o.data_centers.clone(),
                    max_bid_per_gpu: o.max_bid_per_gpu.map(Usd),
                    throughput: o.throughput,
                })
                .collect()
        };
        let j = &c.join;
        let join = match j.mode {
            JoinMode::Worker => {
                let mut env: BTreeMap<String, Secret> = BTreeMap::new();
                if let QueueSourceConfig::Kafka(k) = &c.signals.queue {
                    env.insert(
                        "KAFKA_BOOTSTRAP_SERVERS".into(),
                        Secret::new(k.bootstrap_servers.clone()),
                    );
                    env.insert(
                        "KAFKA_CONSUMER_GROUP".into(),
                        Secret::new(k.consumer_group.clone()),
                    );
                    if !k.topics.is_empty() {
                        env.insert("KAFKA_TOPIC".into(), Secret::new(k.topics.join(",")));
                    }
                }
                if let Some(ck) = &c.checkpoint {
                    // The worker's agent commands reach the same store.
                    env.insert(
                        "RUNPOD_AUTOSCALER__CHECKPOINT__BUCKET".into(),
                        Secret::new(ck.bucket.clone()),
                    );
                    if !ck.prefix.is_empty() {
                        env.insert(
                            "RUNPOD_AUTOSCALER__CHECKPOINT__PREFIX".into(),
                            Secret::new(ck.prefix.clone()),
                        );
                    }
                    if let Some(e) = &ck.endpoint {
                        env.insert("AWS_ENDPOINT_URL".into(), Secret::new(e.clone()));
                    }
                    if let Some(r) = &ck.region {
                        env.insert("AWS_REGION".into(), Secret::new(r.clone()));
                    }
                    if let Some(k) = &ck.access_key_id {
                        env.insert("AWS_ACCESS_KEY_ID".into(), Secret::new(k.clone()));
                    }
                    if let Some(s) = &ck.secret_access_key {
                        env.insert("AWS_SECRET_ACCESS_KEY".into(), s.clone());
                    }
                    for (key, value) in [
                        ("PATH_STYLE", ck.path_style.to_string()),
                        ("PART_SIZE", ck.part_size.to_string()),
                        ("PARALLELISM", ck.parallelism.to_string()),
                        ("KEEP", ck.keep.to_string()),
                    ] {
                        env.insert(
                            format!("RUNPOD_AUTOSCALER__CHECKPOINT__{key}"),
                            Secret::new(value),
                        );
                    }
                }
                for (k, v) in &j.worker_env {
                    env.insert(k.clone(), Secret::new(v.clone()));
                }
                env.extend(j.worker_secret_env.clone());
                JoinPlan::Worker {
                    command: j.worker_command.clone(),
                    env,
                }
            }
            JoinMode::Kubernetes => JoinPlan::Kubernetes {
                template: match j.kubernetes_template {
                    KubeTemplate::K3s => KubeJoin::K3s,
                    KubeTemplate::Kubeadm => KubeJoin::Kubeadm,
                },
                server: j.kubernetes_server.clone(),
                token: join_token.unwrap_or_default(),
                ca_cert_hash: j.kubernetes_ca_cert_hash.clone(),
                labels: j.kubernetes_labels.clone(),
            },
        };
        ReconcileSettings {
            baseline_gpus: c.baseline.gpus,
            cluster: r.cluster.clone(),
            name_prefix: c.runpod.name_prefix.clone(),
            image: r.image.clone(),
            disk_gb: r.disk_gb,
            env: r.env.clone(),
            public_key,
            offers,
            timing: ClaimTiming {
                resolve_timeout: r.claim_resolve_timeout,
                vanish_window: r.vanish_window,
                orphan_grace: r.orphan_grace,
            },
            unavailable_ttl: r.unavailable_ttl,
            quotes_refresh: r.quotes_refresh,
            join,
            health_command: j
                .health_command
                .clone()
                .unwrap_or_else(|| HEALTH_QUERY.to_owned()),
            idle_command: j.idle_command.clone(),
            drain_command: j.drain_command.clone(),
            ssh_timeout: r.ssh_timeout,
            provider_timeout: r.provider_timeout,
            health_interval: r.health_interval,
            unhealthy_after: r.unhealthy_after,
            busy_utilization: r.busy_utilization,
            drain_timeout: r.drain_timeout,
            max_pod_lifetime: r.max_pod_lifetime,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_the_checkpoint_store_of_the_configuration() {
        let text = format!(
            "{}\n[checkpoint]\nbucket = \"jobs\"\nprefix = \"ck\"\nendpoint = \"http://s3:9000\"\n\
             access_key_id = \"AKID\"\nsecret_access_key = \"s3cr3t-value\"\n\
             part_size = \"8MiB\"\nkeep = 7\n",
            include_str!("../../examples/static.toml")
        );
        let config = Config::from_toml(&text).unwrap();
        let settings = ReconcileSettings::from_config(&config, "ssh-ed25519 AAAA".into(), None);
        let JoinPlan::Worker { env, .. } = &settings.join else {
            panic!("worker mode is the default");
        };
        let get = |k: &str| env.get(k).map(|v| v.expose().to_owned());
        let prefix = "RUNPOD_AUTOSCALER__CHECKPOINT__";
        assert_eq!(get(&format!("{prefix}BUCKET")).as_deref(), Some("jobs"));
        assert_eq!(get(&format!("{prefix}PREFIX")).as_deref(), Some("ck"));
        assert_eq!(get(&format!("{prefix}KEEP")).as_deref(), Some("7"));
        assert_eq!(
            get(&format!("{prefix}PART_SIZE")).as_deref(),
            Some("8388608")
        );
        assert_eq!(get(&format!("{prefix}PARALLELISM")).as_deref(), Some("8"));
        assert_eq!(get(&format!("{prefix}PATH_STYLE")).as_deref(), Some("true"));
        assert_eq!(get("AWS_ENDPOINT_URL").as_deref(), Some("http://s3:9000"));
        assert_eq!(
            get("AWS_SECRET_ACCESS_KEY").as_deref(),
            Some("s3cr3t-value")
        );
        assert!(!format!("{:?}", settings.join).contains("s3cr3t-value"));
    }
}
