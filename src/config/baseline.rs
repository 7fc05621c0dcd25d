//! The local baseline: a fixed GPU count, or the one Terraform reports for the OpenStack
//! servers it made (`terraform output -json` of `terraform/`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The local baseline (OpenStack GPU servers made by Terraform).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineConfig {
    /// GPU workers the baseline provides; counted before any RunPod pod. With
    /// `terraform_output`, filled in from that file.
    pub gpus: u32,
    /// A file holding `terraform output -json` of the baseline module; its `baseline_nodes`
    /// (GPUs per node × nodes) give `gpus`. Relative to the configuration file's directory.
    pub terraform_output: Option<PathBuf>,
}

/// What a `terraform output -json` file says about the baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerraformBaseline {
    /// Servers listed.
    pub nodes: usize,
    /// Their GPUs, summed.
    pub gpus: u32,
}

impl BaselineConfig {
    /// Fills `gpus` from `terraform_output` (read relative to `dir`), if set.
    pub(super) fn resolve(&mut self, dir: &Path) -> Result<(), ConfigError> {
        let Some(file) = &self.terraform_output else {
            return Ok(());
        };
        if self.gpus != 0 {
            return Err(ConfigError::Invalid {
                key: "baseline.terraform_output",
                problem: format!("is set together with baseline.gpus = {}", self.gpus),
                fix: "keep one: the Terraform output, or a fixed baseline.gpus",
            });
        }
        let path = if file.is_absolute() {
            file.clone()
        } else {
            dir.join(file)
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
            key: "baseline.terraform_output",
            problem: format!("cannot read {}: {e}", path.display()),
            fix: "write it with `terraform -chdir=terraform output -json > FILE` after `terraform apply`",
        })?;
        let parsed = parse_terraform_output(&text).map_err(|problem| ConfigError::Invalid {
            key: "baseline.terraform_output",
            problem: format!("{}: {problem}", path.display()),
            fix: "point it at the JSON of `terraform output -json` for the module in terraform/",
        })?;
        self.gpus = parsed.gpus;
        Ok(())
    }
}

/// One output of `terraform output -json`.
#[derive(Deserialize)]
struct Output<T> {
    value: T,
}

/// One server of the `baseline_nodes` output.
#[derive(Deserialize)]
struct Node {
    name: String,
    gpus: u32,
}

/// Reads `terraform output -json`: the sum of `baseline_nodes[*].gpus`, checked against
/// `baseline_gpus` when that output is present. The error names what is wrong.
pub fn parse_terraform_output(text: &str) -> Result<TerraformBaseline, String> {
    let outputs: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| format!("not the JSON of `terraform output -json` ({e})"))?;
    let nodes =
        outputs.get("baseline_nodes").ok_or_else(|| {
            let mut names: Vec<&str> = outputs.keys().map(String::as_str).collect();
            names.sort_unstable();
            format!(
            "has no `baseline_nodes` output (outputs: {}); is this the output of the module in \
             terraform/?",
            if names.is_empty() { "none".to_owned() } else { names.join(", ") }
        )
        })?;
    let nodes: Output<Vec<Node>> = serde_json::from_value(nodes.clone())
        .map_err(|e| format!("`baseline_nodes` is not a list of {{name, gpus}} ({e})"))?;
    let mut gpus: u32 = 0;
    for node in &nodes.value {
        if node.gpus == 0 {
            return Err(format!("node {} has 0 GPUs", node.name));
        }
        gpus = gpus
            .checked_add(node.gpus)
            .ok_or_else(|| "the GPU count overflows".to_owned())?;
    }
    if let Some(total) = outputs.get("baseline_gpus") {
        let total: Output<u64> = serde_json::from_value(total.clone())
            .map_err(|e| format!("`baseline_gpus` is not a whole number ({e})"))?;
        if total.value != u64::from(gpus) {
            return Err(format!(
                "`baseline_gpus` is {} but `baseline_nodes` add up to {gpus} GPUs; the file is \
                 inconsistent (edited by hand, or from two applies)",
                total.value
            ));
        }
    }
    Ok(TerraformBaseline {
        nodes: nodes.value.len(),
        gpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../examples/terraform-output.json");

    #[test]
    fn the_sample_output_adds_up_gpus_per_node_times_nodes() {
        assert_eq!(
            parse_terraform_output(SAMPLE).unwrap(),
            TerraformBaseline { nodes: 3, gpus: 4 }
        );
    }

    #[test]
    fn bad_outputs_are_refused_with_what_is_wrong() {
        let cases = [
            ("not json", "not the JSON"),
            (
                r#"{"node_names": {"value": []}}"#,
                "no `baseline_nodes` output (outputs: node_names)",
            ),
            (r#"{"baseline_nodes": {"value": 3}}"#, "not a list"),
            (
                r#"{"baseline_nodes": {"value": [{"name": "a", "gpus": 0}]}}"#,
                "node a has 0 GPUs",
            ),
            (
                r#"{"baseline_nodes": {"value": [{"name": "a", "gpus": 2}]}, "baseline_gpus": {"value": 3}}"#,
                "`baseline_gpus` is 3 but `baseline_nodes` add up to 2",
            ),
            (
                r#"{"baseline_nodes": {"value": [{"name": "a", "gpus": -1}]}}"#,
                "not a list",
            ),
        ];
        for (text, want) in cases {
            let err = parse_terraform_output(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        // No servers at all is a valid (empty) baseline.
        assert_eq!(
            parse_terraform_output(
                r#"{"baseline_nodes": {"value": []}, "baseline_gpus": {"value": 0}}"#
            )
            .unwrap()
            .gpus,
            0
        );
    }

    #[test]
    fn resolve_reads_relative_to_the_config_and_refuses_both_settings() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tf.json"), SAMPLE).unwrap();
        let mut b = BaselineConfig {
            gpus: 0,
            terraform_output: Some("tf.json".into()),
        };
        b.resolve(dir.path()).unwrap();
        assert_eq!(b.gpus, 4);
        let mut both = BaselineConfig {
            gpus: 2,
            terraform_output: Some("tf.json".into()),
        };
        assert!(both
            .resolve(dir.path())
            .unwrap_err()
            .to_string()
            .contains("keep one"));
        let mut missing = BaselineConfig {
            gpus: 0,
            terraform_output: Some("nope.json".into()),
        };
        let err = missing.resolve(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("nope.json") && err.contains("terraform"),
            "{err}"
        );
    }
}
