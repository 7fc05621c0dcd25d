//! RunPod wire types (REST v2 and the GraphQL subset), private to the RunPod client. Lenient:
//! unknown fields are ignored, optional or null fields default, unknown enum values are kept.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{GpuTypeId, PodId, PodState, Timestamp, Usd};
use crate::provider::{Pod, SshEndpoint};

/// `Pod` (only what we read).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WirePod {
    pub(super) id: String,
    #[serde(default)]
    pub(super) name: String,
    #[serde(default = "unknown_status")]
    pub(super) status: PodState,
    #[serde(default)]
    pub(super) gpu: Option<WireGpu>,
    #[serde(default)]
    pub(super) cost: Option<f64>,
    #[serde(default)]
    pub(super) env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) ssh: Option<WireSsh>,
    #[serde(default)]
    pub(super) runtime: Option<WireRuntime>,
    #[serde(default)]
    pub(super) created_at: Option<String>,
}

fn unknown_status() -> PodState {
    PodState::Unknown(String::new())
}

#[derive(Debug, Deserialize)]
pub(super) struct WireGpu {
    pub(super) id: String,
    #[serde(default)]
    pub(super) count: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireSsh {
    #[serde(default)]
    pub(super) direct: Option<WireSshEndpoint>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireSshEndpoint {
    pub(super) host: String,
    pub(super) port: u16,
    #[serde(default)]
    pub(super) username: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireRuntime {
    #[serde(default)]
    pub(super) ports: Option<Vec<WirePort>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WirePort {
    #[serde(default)]
    pub(super) private: Option<u16>,
    #[serde(default)]
    pub(super) public: Option<u16>,
    #[serde(default, rename = "type")]
    pub(super) kind: Option<String>,
    #[serde(default)]
    pub(super) ip: Option<String>,
}

impl WirePod {
    /// The provider-neutral pod. SSH comes from `ssh.direct`, else from the runtime's public
    /// mapping of 22/tcp.
    pub fn into_pod(self) -> Pod {
        let from_ports = || {
            self.runtime
                .as_ref()?
                .ports
                .as_ref()?
                .iter()
                .find(|p| p.private == Some(22) && p.kind.as_deref().unwrap_or("tcp") == "tcp")
                .and_then(|p| {
                    Some(SshEndpoint {
                        host: p.ip.clone()?,
                        port: p.public?,
                        username: "root".into(),
                    })
                })
        };
        let ssh = self
            .ssh
            .as_ref()
            .and_then(|s| s.direct.as_ref())
            .map(|d| SshEndpoint {
                host: d.host.clone(),
                port: d.port,
                username: d.username.clone().unwrap_or_else(|| "root".into()),
            })
            .or_else(from_ports);
        Pod {
            id: PodId(self.id),
            name: self.name,
            state: self.status,
            gpu_type: self.gpu.as_ref().map(|g| GpuTypeId(g.id.clone())),
            gpu_count: self.gpu.as_ref().map(|g| g.count.unwrap_or(1)).unwrap_or(0),
            usd_per_hour: Usd(self.cost.filter(|c| c.is_finite()).unwrap_or(0.0)),
            created_at: self
                .created_at
                .as_deref()
                .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
                .map(Timestamp::from_system),
            ssh,
            env: self.env.unwrap_or_default(),
        }
    }
}

/// `ListPodsResponse`.
#[derive(Debug, Deserialize)]
pub(super) struct WirePodList {
    #[serde(default)]
    pub(super) pods: Vec<WirePod>,
}

/// `CreatePodRequest` (the fields we send).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CreatePod<'a> {
    pub(super) name: &'a str,
    pub(super) image: &'a str,
    pub(super) gpu: CreateGpu<'a>,
    pub(super) cloud: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub(super) data_center_ids: &'a [String],
    pub(super) ports: Vec<&'a str>,
    pub(super) env: &'a BTreeMap<String, String>,
    pub(super) start_ssh: bool,
    pub(super) disk: u32,
}

#[derive(Debug, Serialize)]
pub(super) struct CreateGpu<'a> {
    pub(super) id: &'a str,
    pub(super) count: u32,
}

/// RFC 9457 problem details.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Problem {
    #[serde(default)]
    pub(super) title: Option<String>,
    #[serde(default)]
    pub(super) detail: Option<String>,
    #[serde(default)]
    pub(super) errors: Option<Vec<String>>,
}

impl Problem {
    /// `detail` (or `title`), with `errors` appended.
    pub fn describe(&self) -> String {
        let mut s = self
            .detail
            .clone()
            .or_else(|| self.title.clone())
            .unwrap_or_default();
        if let Some(errors) = self.errors.as_ref().filter(|e| !e.is_empty()) {
            s.push_str(": ");
            s.push_str(&errors.join("; "));
        }
        s
    }
}

/// `ListGpuTypesResponse`.
#[derive(Debug, Deserialize)]
pub(super) struct WireGpuList {
    #[serde(default)]
    pub(super) gpus: Vec<WireGpuType>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireGpuType {
    pub(super) id: String,
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) memory: Option<u32>,
    #[serde(default)]
    pub(super) secure: Option<bool>,
    #[serde(default)]
    pub(super) community: Option<bool>,
    #[serde(default)]
    pub(super) price: Option<WirePrice>,
    #[serde(default)]
    pub(super) availability: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WirePrice {
    #[serde(default)]
    pub(super) secure: Option<f64>,
    #[serde(default)]
    pub(super) community: Option<f64>,
}

/// A GraphQL request.
#[derive(Debug, Serialize)]
pub(super) struct GqlRequest<'a, V: Serialize> {
    pub(super) query: &'a str,
    pub(super) variables: V,
}

/// A GraphQL response: `data` and/or `errors` (errors come with HTTP 200).
#[derive(Debug, Deserialize)]
pub(super) struct GqlResponse<D> {
    #[serde(default = "Option::default")]
    pub(super) data: Option<D>,
    #[serde(default)]
    pub(super) errors: Vec<GqlError>,
}

#[derive(Debug, Deserialize)]
pub(super) struct GqlError {
    #[serde(default)]
    pub(super) message: String,
}

/// `gpuTypes` query result.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GqlGpuTypes {
    #[serde(default)]
    pub(super) gpu_types: Vec<GqlGpuType>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GqlGpuType {
    pub(super) id: String,
    #[serde(default)]
    pub(super) secure_spot_price: Option<f64>,
    #[serde(default)]
    pub(super) community_spot_price: Option<f64>,
    #[serde(default)]
    pub(super) lowest_price: Option<GqlLowestPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GqlLowestPrice {
    #[serde(default)]
    pub(super) minimum_bid_price: Option<f64>,
    #[serde(default)]
    pub(super) stock_status: Option<String>,
}

/// `PodRentInterruptableInput`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SpotInput<'a> {
    pub(super) bid_per_gpu: f64,
    pub(super) gpu_type_id: &'a str,
    pub(super) gpu_count: u32,
    pub(super) cloud_type: &'a str,
    pub(super) name: &'a str,
    pub(super) image_name: &'a str,
    pub(super) ports: &'a str,
    pub(super) env: Vec<GqlEnv<'a>>,
    pub(super) start_ssh: bool,
    pub(super) support_public_ip: bool,
    pub(super) container_disk_in_gb: u32,
}

#[derive(Debug, Serialize)]
pub(super) struct GqlEnv<'a> {
    pub(super) key: &'a str,
    pub(super) value: &'a str,
}

/// `podRentInterruptable` result.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GqlRentResult {
    #[serde(default)]
    pub(super) pod_rent_interruptable: Option<GqlPodId>,
}

#[derive(Debug, Deserialize)]
pub(super) struct GqlPodId {
    pub(super) id: String,
}

/// `myself { pods { id podType } }`.
#[derive(Debug, Deserialize)]
pub(super) struct GqlMyPods {
    #[serde(default)]
    pub(super) myself: Option<GqlMyself>,
}

#[derive(Debug, Deserialize)]
pub(super) struct GqlMyself {
    #[serde(default)]
    pub(super) pods: Option<Vec<GqlPodKind>>,
}

/// A pod's id and `podType` (`INTERRUPTABLE` for spot, `RESERVED` for on-demand).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GqlPodKind {
    pub(super) id: String,
    #[serde(default)]
    pub(super) pod_type: Option<String>,
}

impl GqlMyPods {
    /// Ids of the interruptible pods (RunPod spells the type `INTERRUPTABLE`; any casing, and
    /// the correct spelling, are accepted).
    pub(super) fn interruptible(self) -> std::collections::BTreeSet<PodId> {
        self.myself
            .and_then(|m| m.pods)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| {
                p.pod_type.as_deref().is_some_and(|t| {
                    t.eq_ignore_ascii_case("INTERRUPTABLE")
                        || t.eq_ignore_ascii_case("INTERRUPTIBLE")
                })
            })
            .map(|p| PodId(p.id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_types_name_the_spot_pods() {
        let json = r#"{"myself":{"pods":[{"id":"s","podType":"INTERRUPTABLE"},
            {"id":"d","podType":"RESERVED"},{"id":"n","podType":null},{"id":"x"}]}}"#;
        let pods: GqlMyPods = serde_json::from_str(json).unwrap();
        let spot: Vec<String> = pods.interruptible().into_iter().map(|p| p.0).collect();
        assert_eq!(spot, ["s"]);
        let none: GqlMyPods = serde_json::from_str(r#"{"myself":null}"#).unwrap();
        assert!(none.interruptible().is_empty());
    }

    #[test]
    fn pods_deserialize_leniently() {
        let json = r#"{"pods":[{"id":"abc","name":"rpa-x","status":"HIBERNATING","surprise":{"a":1},
            "gpu":{"id":"NVIDIA RTX A5000"},"cost":null,"env":{"RPA_OWNER":"o"},
            "ssh":{"proxy":null,"direct":null},
            "runtime":{"ports":[{"private":22,"public":40022,"type":"tcp","ip":"127.0.0.1"}]},
            "createdAt":"2026-06-01T12:00:00Z"},{"id":"min"}]}"#;
        let list: WirePodList = serde_json::from_str(json).unwrap();
        let pods: Vec<Pod> = list.pods.into_iter().map(WirePod::into_pod).collect();
        assert_eq!(pods[0].state, PodState::Unknown("HIBERNATING".into()));
        assert_eq!(pods[0].gpu_count, 1);
        assert_eq!(pods[0].ssh.as_ref().unwrap().port, 40022);
        assert_eq!(
            pods[0].created_at,
            Some(Timestamp::from_secs(1_780_315_200))
        );
        assert_eq!(pods[1].name, "");
        assert_eq!(pods[1].usd_per_hour, Usd(0.0));
    }
}
