//! runpod-autoscaler: a KEDA external scaler and RunPod burst autoscaler for a Kubernetes GPU
//! platform. See the README's architecture section for how the modules fit together.

pub mod access;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod decide;
pub mod emulator;
pub mod join;
pub mod mcp;
pub mod model;
pub mod provider;
pub mod reconcile;
pub mod scaler;
pub mod service;
pub mod signals;
pub mod simulate;
pub mod snapshot;
pub mod telemetry;
mod tls;

/// Code generated from `proto/externalscaler.proto` (KEDA's external scaler contract).
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("externalscaler");
}
