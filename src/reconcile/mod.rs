//! The reconciler: it makes the plan happen on RunPod. [`observe`] turns provider pods into
//! the planner's view; [`claims`] persists intent before every create and resolves it against
//! listings; [`fleet`] holds per-pod join, health and retirement state; [`Reconciler`] runs
//! observe → decide → act each tick, with the I/O steps (join over SSH, probes, drain,
//! terminate) as bounded tasks.

pub mod claims;
pub mod fleet;
pub mod observe;
pub mod ops;
mod reconciler;
mod settings;

pub use observe::PodObserver;
pub use ops::{CheckpointCheck, StoreCheck};
pub use reconciler::{Context, FleetEntry, Reconciler, TickReport};
pub use settings::ReconcileSettings;
