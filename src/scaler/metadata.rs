//! Parsing of a trigger's `scalerMetadata` into a [`Trigger`]. Every problem names the key.

use std::collections::HashMap;

use super::parity::{parse_kafka, parse_prometheus, ParitySpec};
use super::ScalerError;

/// Metric name used when the trigger sets none.
pub const DEFAULT_METRIC_NAME: &str = "gpu-demand";

/// Which part of the served demand a `gpu-demand` trigger reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// All of it (baseline and RunPod).
    #[default]
    Total,
    /// The part the local baseline covers: min(demand, baseline GPUs). For a ScaledObject
    /// that scales in-cluster workers while RunPod pods run their own (worker mode).
    Baseline,
    /// The rest, beyond the baseline: what RunPod covers.
    Burst,
}

impl Scope {
    /// The share of `served` GPU workers this scope reads, with `baseline` local GPUs.
    pub fn share(self, served: f64, baseline: f64) -> f64 {
        match self {
            Scope::Total => served,
            Scope::Baseline => served.min(baseline),
            Scope::Burst => (served - baseline).max(0.0),
        }
    }
}

/// What value a trigger reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// GPU workers the work needs (the served demand), or the `scope`d part of it.
    GpuDemand(Scope),
    /// A KEDA-parity trigger (`scaler: kafka` or `scaler: prometheus`), served from the parity
    /// cache.
    Parity(Box<ParitySpec>),
}

impl Source {
    const NAMES: &'static str = "gpu-demand, kafka, prometheus";
}

/// One KEDA trigger, as its metadata configures it.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// Name of the metric (KEDA prefixes it with `s{i}-` on the HPA side).
    pub metric_name: String,
    /// Target value per replica (`targetSize`, > 0).
    pub target: f64,
    /// Active iff value > this (`activationThreshold`, ≥ 0).
    pub activation_threshold: f64,
    /// What value to read.
    pub source: Source,
}

impl Trigger {
    /// Parses KEDA's `scalerMetadata` map.
    pub fn parse(metadata: &HashMap<String, String>) -> Result<Trigger, ScalerError> {
        let parity = match metadata.get("scaler").map(|s| s.trim()) {
            None | Some("") | Some("gpu-demand") => None,
            Some("kafka") => Some(parse_kafka(metadata)?),
            Some("prometheus") => Some(parse_prometheus(metadata)?),
            Some(name) => {
                return Err(ScalerError::InvalidMetadata {
                    key: "scaler",
                    problem: format!("unknown scaler {name:?}"),
                    fix: format!("use one of: {}", Source::NAMES),
                })
            }
        };
        let default_name = parity
            .as_ref()
            .map_or(DEFAULT_METRIC_NAME, |(_, _, _, name)| name.as_str());
        let metric_name = match metadata.get("metricName").map(|s| s.trim()) {
            None | Some("") => default_name.to_owned(),
            Some(name) => name.to_owned(),
        };
        if let Some((spec, target, activation_threshold, _)) = parity {
            // KEDA's own keys (lagThreshold / threshold, activation*) set target and activation.
            return Ok(Trigger {
                metric_name,
                target,
                activation_threshold,
                source: Source::Parity(Box::new(spec)),
            });
        }
        let target = number(metadata, "targetSize", 1.0)?;
        if target <= 0.0 {
            return Err(ScalerError::InvalidMetadata {
                key: "targetSize",
                problem: format!("{target} is not above zero"),
                fix: "set a positive target per replica, e.g. \"1\" or \"0.5\"".into(),
            });
        }
        let activation_threshold = number(metadata, "activationThreshold", 0.0)?;
        let scope = match metadata.get("scope").map(|s| s.trim()) {
            None | Some("") | Some("total") => Scope::Total,
            Some("baseline") => Scope::Baseline,
            Some("burst") => Scope::Burst,
            Some(other) => {
                return Err(ScalerError::InvalidMetadata {
                    key: "scope",
                    problem: format!("unknown scope {other:?}"),
                    fix: "use total (default), baseline or burst".into(),
                })
            }
        };
        Ok(Trigger {
            metric_name,
            target,
            activation_threshold,
            source: Source::GpuDemand(scope),
        })
    }
}

/// A finite, non-negative number under `key`, or `default` when absent.
fn number(
    metadata: &HashMap<String, String>,
    key: &'static str,
    default: f64,
) -> Result<f64, ScalerError> {
    let Some(raw) = metadata.get(key) else {
        return Ok(default);
    };
    let value: f64 = raw
        .trim()
        .parse()
        .map_err(|_| ScalerError::InvalidMetadata {
            key,
            problem: format!("{raw:?} is not a number"),
            fix: "set a decimal number such as \"2\" or \"0.5\"".into(),
        })?;
    if !value.is_finite() || value < 0.0 {
        return Err(ScalerError::InvalidMetadata {
            key,
            problem: format!("{raw:?} is negative or not finite"),
            fix: "set a finite number ≥ 0".into(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults() {
        let t = Trigger::parse(&meta(&[("scalerAddress", "x:9090")])).unwrap();
        assert_eq!(t.metric_name, "gpu-demand");
        assert_eq!(t.target, 1.0);
        assert_eq!(t.activation_threshold, 0.0);
        assert_eq!(t.source, Source::GpuDemand(Scope::Total));
    }

    #[test]
    fn scopes_split_the_served_demand_at_the_baseline() {
        for (name, scope) in [
            ("total", Scope::Total),
            ("baseline", Scope::Baseline),
            ("burst", Scope::Burst),
        ] {
            let t = Trigger::parse(&meta(&[("scope", name)])).unwrap();
            assert_eq!(t.source, Source::GpuDemand(scope));
        }
        // (served, baseline) → (total, baseline share, burst share)
        for (served, baseline, want) in [
            (10.0, 2.0, (10.0, 2.0, 8.0)),
            (1.0, 2.0, (1.0, 1.0, 0.0)),
            (0.0, 2.0, (0.0, 0.0, 0.0)),
            (5.0, 0.0, (5.0, 0.0, 5.0)),
        ] {
            let got = (
                Scope::Total.share(served, baseline),
                Scope::Baseline.share(served, baseline),
                Scope::Burst.share(served, baseline),
            );
            assert_eq!(got, want, "served {served}, baseline {baseline}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        for (pairs, key) in [
            (vec![("targetSize", "abc")], "targetSize"),
            (vec![("targetSize", "-1")], "targetSize"),
            (vec![("targetSize", "0")], "targetSize"),
            (vec![("targetSize", "NaN")], "targetSize"),
            (vec![("activationThreshold", "-0.5")], "activationThreshold"),
            (vec![("activationThreshold", "inf")], "activationThreshold"),
            (vec![("scaler", "kafkaa")], "scaler"),
            (vec![("scope", "cluster")], "scope"),
        ] {
            let err = Trigger::parse(&meta(&pairs)).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }
}
