//! Spend: what our pods cost per hour now and what they have cost so far, in total and by GPU
//! type. Pure: the caller passes the pods and the provider's billing per pod.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::provider::Pod;

/// Spend of one GPU type (or of all pods, for the total line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostLine {
    /// GPU type id (`-` for CPU pods, `TOTAL` for the sum).
    pub gpu_type: String,
    /// Pods listed.
    pub pods: usize,
    /// GPUs on those pods.
    pub gpus: u32,
    /// Current $/h (stopped pods cost 0 here).
    pub usd_per_hour: f64,
    /// Billed so far.
    pub accrued_usd: f64,
}

/// Lines per GPU type (sorted by id), then a `TOTAL` line. `billed` maps pod ids to what the
/// provider billed them; a pod missing from it has accrued nothing yet.
pub fn by_gpu_type(pods: &[Pod], billed: &BTreeMap<String, f64>) -> Vec<CostLine> {
    let mut lines: BTreeMap<String, CostLine> = BTreeMap::new();
    for p in pods {
        let ty = p
            .gpu_type
            .as_ref()
            .map(|g| g.as_str().to_owned())
            .unwrap_or_else(|| "-".into());
        let l = lines.entry(ty.clone()).or_insert_with(|| CostLine {
            gpu_type: ty,
            pods: 0,
            gpus: 0,
            usd_per_hour: 0.0,
            accrued_usd: 0.0,
        });
        l.pods += 1;
        l.gpus += p.gpu_count;
        l.usd_per_hour += p.usd_per_hour.dollars();
        l.accrued_usd += billed.get(p.id.as_str()).copied().unwrap_or(0.0);
    }
    let mut out: Vec<CostLine> = lines.into_values().collect();
    let total = CostLine {
        gpu_type: "TOTAL".into(),
        pods: out.iter().map(|l| l.pods).sum(),
        gpus: out.iter().map(|l| l.gpus).sum(),
        usd_per_hour: out.iter().map(|l| l.usd_per_hour).sum(),
        accrued_usd: out.iter().map(|l| l.accrued_usd).sum(),
    };
    out.push(total);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GpuTypeId, PodId, PodState, Usd};

    fn pod(id: &str, gpu: Option<&str>, count: u32, rate: f64) -> Pod {
        Pod {
            id: PodId(id.into()),
            name: format!("rpa-{id}"),
            state: PodState::Running,
            gpu_type: gpu.map(|g| GpuTypeId(g.into())),
            gpu_count: count,
            usd_per_hour: Usd(rate),
            created_at: None,
            ssh: None,
            env: Default::default(),
        }
    }

    #[test]
    fn totals_group_by_gpu_type_and_sum_billing() {
        let pods = [
            pod("a", Some("NVIDIA L40S"), 2, 1.8),
            pod("b", Some("NVIDIA A40"), 1, 0.4),
            pod("c", Some("NVIDIA L40S"), 1, 0.9),
            pod("d", None, 0, 0.1),
        ];
        let billed = BTreeMap::from([("a".to_owned(), 3.0), ("c".to_owned(), 0.5)]);
        let lines = by_gpu_type(&pods, &billed);
        let names: Vec<&str> = lines.iter().map(|l| l.gpu_type.as_str()).collect();
        assert_eq!(names, ["-", "NVIDIA A40", "NVIDIA L40S", "TOTAL"]);
        let l40s = &lines[2];
        assert_eq!((l40s.pods, l40s.gpus), (2, 3));
        assert!((l40s.usd_per_hour - 2.7).abs() < 1e-9);
        assert!((l40s.accrued_usd - 3.5).abs() < 1e-9);
        let total = &lines[3];
        assert_eq!((total.pods, total.gpus), (4, 4));
        assert!((total.usd_per_hour - 3.2).abs() < 1e-9);
        assert!((total.accrued_usd - 3.5).abs() < 1e-9);
        assert_eq!(by_gpu_type(&[], &billed).len(), 1, "only the total");
    }
}
