//! The reconciler's side of the loop: turning what the provider reports into the planner's
//! [`crate::decide::ClusterView`] ([`observe`]). Executing plans (launch, join, drain,
//! terminate) builds on it.

pub mod claims;
pub mod observe;

pub use observe::PodObserver;
