//! The reconcile loop, kube-rs style: a [`Context`] holds the I/O handles, [`Reconciler::tick`]
//! observes (one complete listing), decides (the pure planner) and acts, and says when to act
//! again. Steps are idempotent; the long ones (join, probes, drain, terminate) run as tasks whose
//! outcomes the next tick reads, each with a deadline and, on failure, a backoff
//! ([`super::fleet::Backoff`]): a later tick retries, never a hot loop.
//!
//! Money first: a claim is written (durably) before every create, counts against `max_pods` and
//! the budget at its real price until it is retired, and claims left unresolved by an earlier
//! process are resolved before any new create.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::claims::{pod_name, resolve, Claim, ClaimKey, ClaimStage, ClaimStore, Resolution};
use super::fleet::{JoinState, PodRuntime, RetirePhase, RetireReason, Retiring};
use super::ops::{self, CheckpointCheck, JoinJob, JoinOutcome, OpResult, Outcome};
use super::settings::ReconcileSettings;
use crate::clock::Clock;
use crate::decide::offers::{candidates, Availability, Candidate, MarketKey, Quote, Unavailable};
use crate::decide::{
    decide, ClusterView, Plan, PodTemplate, PodView, Policy, Reason, Signals, Step,
};
use crate::join::pod::PodShell;
use crate::join::SshTarget;
use crate::model::{PodId, PodState, Timestamp, Usd};
use crate::provider::{CloudProvider, LaunchSpec, Offering, Pod, ProviderError, Stock};
use crate::telemetry::Metrics;

/// The I/O handles (one real implementation each) and the settings.
pub struct Context {
    /// The cloud.
    pub provider: Arc<dyn CloudProvider>,
    /// Commands on pods.
    pub shell: Arc<dyn PodShell>,
    /// Intent, persisted.
    pub claims: Arc<dyn ClaimStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Checkpoints, when a store is configured: a draining pod is terminated only once each
    /// job it had is checkpointed (or finished).
    pub checkpoints: Option<Arc<dyn CheckpointCheck>>,
    /// Settings.
    pub settings: ReconcileSettings,
}

/// One pod as the operator sees it (`/debug/plan`'s fleet).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetEntry {
    /// Its claim's slot and generation (none for an orphan).
    pub claim: Option<ClaimKey>,
    /// The pod, once known.
    pub pod: Option<PodId>,
    /// Provider state (`MISSING` when not in the last listing).
    pub state: String,
    /// Where it is bought.
    pub market: Option<MarketKey>,
    /// $/h counted for it.
    pub usd_per_hour: Usd,
    /// Join progress.
    pub join: Option<JoinState>,
    /// Serving (joined and healthy).
    pub ready: bool,
    /// Highest GPU utilization at the last probe.
    pub utilization: Option<f64>,
    /// Since the last busy probe (or creation).
    #[serde(with = "humantime_serde")]
    pub idle_for: Option<Duration>,
    /// Retirement, when decided.
    pub retiring: Option<Retiring>,
    /// The last failure of a step on this pod (SSH, probe), while it keeps failing.
    pub last_error: Option<String>,
    /// Consecutive failures of its steps (each one backs off).
    pub failures: u32,
}

/// What a tick did.
#[derive(Debug, Clone)]
pub struct TickReport {
    /// The plan (from the planner, with `NotSynced` until the first complete listing).
    pub plan: Plan,
    /// The fleet after acting.
    pub fleet: Vec<FleetEntry>,
    /// Problems of this tick (provider or store failures), for logs and `/debug/plan`.
    pub errors: Vec<String>,
    /// Act again after this long at the latest.
    pub requeue_after: Duration,
}

/// The reconciler's state: the claims (mirroring the store) and what memory holds per pod.
pub struct Reconciler {
    ctx: Arc<Context>,
    claims: BTreeMap<ClaimKey, Claim>,
    runtime: BTreeMap<PodId, PodRuntime>,
    /// Pods no claim explains, being terminated (orphans, duplicates).
    strays: BTreeMap<PodId, Retiring>,
    first_seen: BTreeMap<PodId, Timestamp>,
    unavailable: Unavailable,
    quotes: Option<(Timestamp, Vec<Quote>)>,
    synced: bool,
    /// Unresolved claims an earlier process left: no create until they are resolved.
    inherited: BTreeSet<ClaimKey>,
    ops: JoinSet<OpResult>,
    busy: BTreeSet<PodId>,
    last_listing: Vec<Pod>,
    last_spend_at: Option<Timestamp>,
}

/// The shortest time between two ticks the reconciler asks for while work is in flight.
const BUSY_REQUEUE: Duration = Duration::from_secs(1);

impl Reconciler {
    /// A reconciler on the claims in the store (an earlier process's included).
    pub fn new(ctx: Arc<Context>) -> Result<Reconciler, super::claims::ClaimError> {
        let loaded = ctx.claims.load()?;
        let inherited = loaded
            .iter()
            .filter(|c| c.is_unresolved())
            .map(|c| c.key)
            .collect();
        let mut runtime = BTreeMap::new();
        for c in &loaded {
            if let Some(pod) = &c.pod {
                let mut r = PodRuntime::new(c.joined);
                if c.stage == ClaimStage::Retiring {
                    // Drain again (idempotent): the earlier process may have died mid-drain.
                    r.retiring = Some(Retiring::new(
                        RetireReason::Planned("resumed after restart".into()),
                        c.joined,
                        ctx.clock.now(),
                    ));
                }
                runtime.insert(pod.clone(), r);
            }
        }
        info!(claims = loaded.len(), "reconciler starting");
        Ok(Reconciler {
            claims: loaded.into_iter().map(|c| (c.key, c)).collect(),
            ctx,
            runtime,
            strays: BTreeMap::new(),
            first_seen: BTreeMap::new(),
            unavailable: Unavailable::new(),
            quotes: None,
            synced: false,
            inherited,
            ops: JoinSet::new(),
            busy: BTreeSet::new(),
            last_listing: Vec::new(),
            last_spend_at: None,
        })
    }

    /// The open claims.
    pub fn claims(&self) -> impl Iterator<Item = &Claim> {
        self.claims.values()
    }

    /// True once a complete listing succeeded.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Waits for every step in flight and applies their outcomes (tests, shutdown).
    pub async fn settle(&mut self) {
        while let Some(done) = self.ops.join_next().await {
            if let Ok(result) = done {
                self.apply(result);
            }
        }
    }

    /// Number of steps in flight.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Observe and decide without acting: the plan a tick would carry out now (the `plan`
    /// command). Use it on a reconciler over a copy of the claims ([`super::claims::MemoryClaims`]).
    pub async fn preview(&mut self, signals: &Signals, policy: &Policy) -> TickReport {
        self.round(signals, policy, false).await
    }

    /// One round: read finished steps, list, resolve claims, decide, act.
    pub async fn tick(&mut self, signals: &Signals, policy: &Policy) -> TickReport {
        self.round(signals, policy, true).await
    }

    async fn round(&mut self, signals: &Signals, policy: &Policy, act: bool) -> TickReport {
        let now = self.ctx.clock.now();
        let mut errors = Vec::new();
        while let Some(done) = self.ops.try_join_next() {
            match done {
                Ok(result) => self.apply(result),
                Err(e) => warn!(error = %e, "a reconcile step panicked or was aborted"),
            }
        }

        let settings = &self.ctx.settings;
        match ops::bounded(
            &self.ctx.metrics,
            settings.provider_timeout,
            "list",
            self.ctx.provider.list(),
        )
        .await
        {
            Ok(pods) => {
                self.synced = true;
                self.last_listing = pods;
                self.observe(now, &mut errors);
            }
            Err(e) => {
                warn!(error = %e, "listing our pods failed; acting on nothing new this tick");
                self.ctx.metrics.reconcile_failure("list");
                errors.push(format!("list: {e}"));
            }
        }

        let template = self.template(now, &mut errors).await;
        let policy = Policy {
            pod: template.clone().unwrap_or_else(|| policy.pod.clone()),
            ..policy.clone()
        };
        let view = self.view(now);
        let mut plan = decide(&view, signals, &policy, now);
        if self.synced && act {
            self.execute(&mut plan, &policy, template.is_some(), now, &mut errors)
                .await;
            self.advance(now);
        }
        if act {
            self.account(now);
        }
        let requeue_after = if self.ops.is_empty() {
            Duration::from_secs(5)
        } else {
            BUSY_REQUEUE
        };
        TickReport {
            fleet: self.fleet(now),
            plan,
            errors,
            requeue_after,
        }
    }

    /// Resolves claims against the listing just read.
    fn observe(&mut self, now: Timestamp, errors: &mut Vec<String>) {
        let pods = self.last_listing.clone();
        self.first_seen
            .retain(|id, _| pods.iter().any(|p| &p.id == id));
        for p in &pods {
            self.first_seen.entry(p.id.clone()).or_insert(now);
        }
        let claims: Vec<Claim> = self.claims.values().cloned().collect();
        let ctx = self.ctx.clone();
        let settings = &ctx.settings;
        let resolutions = resolve(
            &claims,
            &pods,
            &settings.name_prefix,
            &self.first_seen,
            &settings.timing,
            now,
        );
        for r in resolutions {
            match r {
                Resolution::Adopt { key, pod } => {
                    info!(%key, %pod, "pod of an unresolved claim found; adopted");
                    self.update_claim(key, errors, |c| {
                        c.pod = Some(pod.clone());
                        if c.stage == ClaimStage::Launching {
                            c.stage = ClaimStage::Bound;
                        }
                    });
                    let retiring = self
                        .claims
                        .get(&key)
                        .is_some_and(|c| c.stage == ClaimStage::Retiring);
                    let mut rt = PodRuntime::new(false);
                    if retiring {
                        rt.retiring = Some(Retiring::new(
                            RetireReason::Planned("abandoned before its pod showed up".into()),
                            false,
                            now,
                        ));
                    }
                    self.runtime.entry(pod).or_insert(rt);
                    self.inherited.remove(&key);
                }
                Resolution::Retire { key } => {
                    info!(%key, "unresolved claim's pod never showed up; retired");
                    self.remove_claim(key, errors);
                    self.inherited.remove(&key);
                }
                Resolution::Missing { key } => {
                    self.update_claim(key, errors, |c| c.missing_since = Some(now));
                }
                Resolution::Found { key } => {
                    self.update_claim(key, errors, |c| c.missing_since = None);
                }
                Resolution::Vanished { key, pod } => {
                    if !self.busy.contains(&pod) {
                        self.spawn_confirm(Some(key), pod, now);
                    }
                }
                Resolution::Duplicate { pod } => {
                    warn!(%pod, "a second pod for one slot; terminating it");
                    self.strays
                        .entry(pod)
                        .or_insert_with(|| Retiring::new(RetireReason::Duplicate, false, now));
                }
                Resolution::Orphan { pod } => {
                    if !self.strays.contains_key(&pod) {
                        warn!(%pod, "a pod of ours that no claim explains; terminating it");
                        self.ctx.metrics.orphans_collected.inc();
                        self.strays
                            .insert(pod, Retiring::new(RetireReason::Orphan, false, now));
                    }
                }
            }
        }
        // Stray pods that are gone are done.
        self.strays.retain(|id, _| {
            pods.iter()
                .any(|p| &p.id == id && p.state != PodState::Terminated)
        });
        // Lifetime: old serving pods are replaced, drained first.
        if let Some(limit) = settings.max_pod_lifetime {
            for c in self.claims.values() {
                let Some(pod) = &c.pod else { continue };
                let Some(rt) = self.runtime.get_mut(pod) else {
                    continue;
                };
                if rt.retiring.is_none() && now.saturating_since(c.created_at) >= limit {
                    rt.retiring = Some(Retiring::new(RetireReason::Lifetime, c.joined, now));
                }
            }
        }
    }

    /// The pod template of the cheapest offer now (quotes re-read when stale); `None` when no
    /// offer can be bought.
    async fn template(&mut self, now: Timestamp, errors: &mut Vec<String>) -> Option<PodTemplate> {
        let ctx = self.ctx.clone();
        let settings = &ctx.settings;
        let stale = self
            .quotes
            .as_ref()
            .is_none_or(|(at, _)| now.saturating_since(*at) >= settings.quotes_refresh);
        if stale {
            match ops::bounded(
                &ctx.metrics,
                settings.provider_timeout,
                "offerings",
                ctx.provider.offerings(),
            )
            .await
            {
                Ok(offerings) => self.quotes = Some((now, offerings.iter().map(quote).collect())),
                Err(e) => {
                    errors.push(format!("offerings: {e}"));
                    self.ctx.metrics.reconcile_failure("offerings");
                }
            }
        }
        self.unavailable.expire(now);
        let best = self.candidates(now).into_iter().next()?;
        Some(PodTemplate {
            gpu_type: best.market.gpu_type.clone(),
            gpus: best.gpus,
            usd_per_hour: best.usd_per_hour,
        })
    }

    fn candidates(&self, now: Timestamp) -> Vec<Candidate> {
        let quotes = self
            .quotes
            .as_ref()
            .map(|(_, q)| q.as_slice())
            .unwrap_or(&[]);
        candidates(&self.ctx.settings.offers, quotes, &self.unavailable, now)
    }

    /// The planner's view: claimed pods (unresolved claims as pods still provisioning, at their
    /// price), plus stray pods as existing but not capacity, so limits count everything that
    /// may bill.
    fn view(&self, now: Timestamp) -> ClusterView {
        let mut pods = Vec::new();
        for c in self.claims.values() {
            let listed = c
                .pod
                .as_ref()
                .and_then(|id| self.last_listing.iter().find(|p| &p.id == id));
            let rt = c.pod.as_ref().and_then(|id| self.runtime.get(id));
            let id = c.pod.clone().unwrap_or_else(|| claim_pod_id(c.key));
            let state = match (listed, &c.pod) {
                (Some(p), _) => p.state.clone(),
                (None, None) => PodState::Provisioning,
                (None, Some(_)) => PodState::Unknown("MISSING".into()),
            };
            if state == PodState::Terminated {
                continue;
            }
            let price = listed
                .map(|p| p.usd_per_hour)
                .filter(|u| u.dollars() > 0.0)
                .unwrap_or(c.usd_per_hour);
            let first_seen = c
                .pod
                .as_ref()
                .and_then(|id| self.first_seen.get(id))
                .copied();
            let created_at = [
                Some(c.created_at),
                listed.and_then(|p| p.created_at),
                first_seen,
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now);
            pods.push(PodView {
                id,
                state,
                gpus: c.gpus,
                usd_per_hour: price,
                created_at,
                ready: rt.is_some_and(PodRuntime::is_ready),
                last_busy_at: rt.and_then(|r| r.last_busy_at),
                draining: c.stage == ClaimStage::Retiring
                    || rt.is_some_and(|r| r.retiring.is_some()),
            });
        }
        for p in &self.last_listing {
            let claimed = self.claims.values().any(|c| c.pod.as_ref() == Some(&p.id));
            if claimed || p.state == PodState::Terminated {
                continue;
            }
            pods.push(PodView {
                id: p.id.clone(),
                state: p.state.clone(),
                gpus: p.gpu_count,
                usd_per_hour: p.usd_per_hour,
                created_at: self.first_seen.get(&p.id).copied().unwrap_or(now),
                ready: false,
                last_busy_at: None,
                // Not capacity (no claim, not ours to serve with); still counted by the limits.
                draining: true,
            });
        }
        ClusterView {
            synced: self.synced,
            baseline_gpus: self.ctx.settings.baseline_gpus,
            pods,
        }
    }

    /// Carries out the plan's steps.
    async fn execute(
        &mut self,
        plan: &mut Plan,
        policy: &Policy,
        can_buy: bool,
        now: Timestamp,
        errors: &mut Vec<String>,
    ) {
        for step in plan.steps.clone() {
            if let Step::Terminate { pod, reason } = step {
                self.retire_planned(&pod, &reason, now, errors);
            }
        }
        let launches = plan.launches();
        if launches == 0 {
            return;
        }
        if !can_buy {
            errors.push(
                "no offer can be bought now (all out of stock or unavailable); launches wait"
                    .into(),
            );
            return;
        }
        if !self.inherited.is_empty() {
            debug!(
                open = self.inherited.len(),
                "claims of an earlier run still unresolved; no create yet"
            );
            return;
        }
        for _ in 0..launches {
            if !self.launch_one(policy, now, errors).await {
                break;
            }
        }
    }

    fn retire_planned(
        &mut self,
        pod: &PodId,
        reason: &Reason,
        now: Timestamp,
        errors: &mut Vec<String>,
    ) {
        let why = reason.to_string();
        // A claim without a pod yet: it is abandoned; its pod, if it shows up, goes at once.
        if let Some(key) = parse_claim_pod_id(pod) {
            self.update_claim(key, errors, |c| c.stage = ClaimStage::Retiring);
            return;
        }
        let Some(key) = self
            .claims
            .values()
            .find(|c| c.pod.as_ref() == Some(pod))
            .map(|c| c.key)
        else {
            return;
        };
        let joined = self.claims.get(&key).is_some_and(|c| c.joined);
        let rt = self
            .runtime
            .entry(pod.clone())
            .or_insert_with(|| PodRuntime::new(joined));
        if rt.retiring.is_none() {
            info!(%pod, reason = %why, "retiring");
            rt.retiring = Some(Retiring::new(RetireReason::Planned(why), joined, now));
            self.update_claim(key, errors, |c| c.stage = ClaimStage::Retiring);
        }
    }

    /// Claims, launches and binds one pod; false when launching must stop for this tick.
    async fn launch_one(
        &mut self,
        policy: &Policy,
        now: Timestamp,
        errors: &mut Vec<String>,
    ) -> bool {
        let Some(slot) = (0..policy.max_pods).find(|s| !self.claims.keys().any(|k| k.slot == *s))
        else {
            return false;
        };
        let spend = self.spend_rate();
        let existing = self.existing_count();
        if existing >= policy.max_pods {
            return false;
        }
        for cand in self.candidates(now) {
            // The budget counts each pod at its real price (a fallback may cost more).
            if spend.dollars() + cand.usd_per_hour.dollars()
                > policy.max_usd_per_hour.dollars() + Usd::EPSILON
            {
                continue;
            }
            let ctx = self.ctx.clone();
            let settings = &ctx.settings;
            let claim = match ctx.claims.create(slot, &|key| Claim {
                key,
                name: pod_name(&settings.cluster, key),
                market: cand.market.clone(),
                gpus: cand.gpus,
                usd_per_hour: cand.usd_per_hour,
                bid_per_gpu: cand.bid_per_gpu,
                data_centers: cand.data_centers.clone(),
                created_at: now,
                stage: ClaimStage::Launching,
                pod: None,
                missing_since: None,
                joined: false,
            }) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("claim store: {e}"));
                    self.ctx.metrics.reconcile_failure("claim_store");
                    return false;
                }
            };
            self.claims.insert(claim.key, claim.clone());
            let spec = self.launch_spec(&claim);
            let result = ops::bounded(
                &ctx.metrics,
                settings.provider_timeout,
                "create",
                ctx.provider.create(&spec),
            )
            .await;
            match result {
                Ok(pod) => {
                    info!(key = %claim.key, pod = %pod.id, market = ?cand.market, "launched");
                    self.ctx.metrics.reconcile_launch(if cand.market.spot {
                        "spot"
                    } else {
                        "on_demand"
                    });
                    let pod_id = pod.id.clone();
                    self.update_claim(claim.key, errors, |c| {
                        c.pod = Some(pod_id.clone());
                        c.stage = ClaimStage::Bound;
                    });
                    self.runtime
                        .entry(pod.id.clone())
                        .or_insert_with(|| PodRuntime::new(false));
                    self.first_seen.entry(pod.id).or_insert(now);
                    return true;
                }
                Err(ProviderError::CapacityExhausted { .. }) => {
                    // Nothing was created: drop the claim and move on to the next offer now.
                    info!(market = ?cand.market, "no capacity; trying the next offer");
                    self.ctx.metrics.reconcile_failure("capacity");
                    self.unavailable
                        .mark(cand.market.clone(), now, settings.unavailable_ttl);
                    self.remove_claim(claim.key, errors);
                }
                Err(
                    e @ (ProviderError::Transient { .. }
                    | ProviderError::Timeout { .. }
                    | ProviderError::Cancelled { .. }),
                ) => {
                    // Ambiguous: the pod may exist. The claim stays and later listings resolve it.
                    warn!(key = %claim.key, error = %e, "create outcome unknown; the claim stays until a listing resolves it");
                    self.ctx.metrics.reconcile_failure("create_ambiguous");
                    errors.push(format!("launch {}: {e}", claim.key));
                    return false;
                }
                Err(e) => {
                    // Refused before anything was created (auth, bad request, rate limit).
                    warn!(key = %claim.key, error = %e, "create refused");
                    self.ctx.metrics.reconcile_failure("create_refused");
                    errors.push(format!("launch {}: {e}", claim.key));
                    self.remove_claim(claim.key, errors);
                    return false;
                }
            }
        }
        false
    }

    fn launch_spec(&self, claim: &Claim) -> LaunchSpec {
        let s = &self.ctx.settings;
        let mut env = s.env.clone();
        env.insert("PUBLIC_KEY".into(), s.public_key.clone());
        env.insert("RPA_SLOT".into(), claim.key.slot.to_string());
        LaunchSpec {
            name: claim.name.clone(),
            gpu_type: claim.market.gpu_type.clone(),
            gpu_count: claim.gpus,
            cloud: claim.market.cloud,
            image: s.image.clone(),
            env,
            spot_bid_per_gpu: claim.bid_per_gpu,
            data_center_ids: claim.data_centers.clone(),
            disk_gb: s.disk_gb,
        }
    }

    /// Spend rate of everything that may bill: claims at their price, strays at theirs.
    fn spend_rate(&self) -> Usd {
        self.view(self.ctx.clock.now()).usd_per_hour()
    }

    fn existing_count(&self) -> u32 {
        u32::try_from(self.view(self.ctx.clock.now()).existing_pods().count()).unwrap_or(u32::MAX)
    }

    /// Starts the steps each pod needs now: join, probe, drain, terminate, confirm.
    fn advance(&mut self, now: Timestamp) {
        let settings = self.ctx.settings.clone();
        let listing = self.last_listing.clone();
        let claims: Vec<Claim> = self.claims.values().cloned().collect();
        for c in &claims {
            let Some(pod_id) = c.pod.clone() else {
                continue;
            };
            if self.busy.contains(&pod_id) {
                continue;
            }
            let listed = listing.iter().find(|p| p.id == pod_id);
            let Some(rt) = self.runtime.get_mut(&pod_id) else {
                continue;
            };
            if !rt.backoff.ready(now) {
                continue;
            }
            let target = listed.and_then(|p| p.ssh.as_ref()).map(|s| SshTarget {
                host: s.host.clone(),
                port: s.port,
                user: s.username.clone(),
            });
            if let Some(retiring) = rt.retiring.clone() {
                self.advance_retiring(c.key, &pod_id, retiring, target, now);
                continue;
            }
            if listed.is_some_and(|p| p.state.is_dead()) {
                continue; // the planner terminates dead pods
            }
            match (&rt.join, target) {
                (JoinState::Failed { .. }, _) => {
                    rt.retiring = Some(Retiring::new(RetireReason::JoinFailed, false, now));
                }
                (JoinState::Joined, Some(target)) => {
                    if rt.health.is_dead(now, settings.unhealthy_after) {
                        warn!(pod = %pod_id, error = ?rt.health.last_error, "pod unhealthy; replacing it");
                        rt.retiring = Some(Retiring::new(RetireReason::Unhealthy, true, now));
                    } else if rt.health.probe_due(now, settings.health_interval) {
                        rt.health.last_probe = Some(now);
                        self.spawn_probe(c.key, pod_id.clone(), target, now);
                    }
                }
                (JoinState::Joined, None) => {
                    // Joined but no endpoint in the listing (missing, or RunPod lost the mapping).
                    rt.health
                        .failed(now, "no SSH endpoint in the listing".into());
                    if rt.health.is_dead(now, settings.unhealthy_after) {
                        rt.retiring = Some(Retiring::new(RetireReason::Unhealthy, true, now));
                    }
                }
                (_, Some(target)) if listed.is_some_and(Pod::is_ready) => {
                    rt.join = JoinState::Bootstrapping;
                    rt.join_started.get_or_insert(now);
                    let job = JoinJob {
                        shell: self.ctx.shell.clone(),
                        pod: pod_id.clone(),
                        target,
                        command: settings.join.command(pod_id.as_str()),
                        health_command: settings.health_command.clone(),
                        gpu_type: c.market.gpu_type.to_string(),
                        gpus: c.gpus,
                        timeout: settings.ssh_timeout,
                    };
                    self.busy.insert(pod_id.clone());
                    let key = c.key;
                    self.ops.spawn(async move {
                        let pod = job.pod.clone();
                        OpResult {
                            outcome: Outcome::Join(ops::join(job).await),
                            pod,
                            claim: Some(key),
                            started: now,
                        }
                    });
                }
                _ => {}
            }
        }
        for (pod, retiring) in self.strays.clone() {
            if !self.busy.contains(&pod) {
                self.advance_retiring_stray(pod, retiring, now);
            }
        }
    }

    fn spawn_probe(&mut self, key: ClaimKey, pod: PodId, target: SshTarget, now: Timestamp) {
        let s = &self.ctx.settings;
        let (shell, command, idle, timeout) = (
            self.ctx.shell.clone(),
            s.health_command.clone(),
            s.idle_command.clone(),
            s.ssh_timeout,
        );
        self.busy.insert(pod.clone());
        self.ops.spawn(async move {
            OpResult {
                outcome: Outcome::Probe(
                    ops::probe(shell, pod.clone(), target, command, idle, timeout).await,
                ),
                pod,
                claim: Some(key),
                started: now,
            }
        });
    }

    fn advance_retiring(
        &mut self,
        key: ClaimKey,
        pod: &PodId,
        retiring: Retiring,
        target: Option<SshTarget>,
        now: Timestamp,
    ) {
        let s = self.ctx.settings.clone();
        match retiring.phase {
            RetirePhase::Drain => match target {
                Some(target) => {
                    let (shell, command) = (self.ctx.shell.clone(), s.drain_command.clone());
                    let p = pod.clone();
                    self.busy.insert(pod.clone());
                    self.ops.spawn(async move {
                        OpResult {
                            outcome: Outcome::Drained(
                                ops::drain(shell, p.clone(), target, command, s.ssh_timeout).await,
                            ),
                            pod: p,
                            claim: Some(key),
                            started: now,
                        }
                    });
                }
                // Unreachable: nothing to drain through; terminate.
                None => self.set_phase(pod, RetirePhase::Terminate),
            },
            RetirePhase::WaitIdle { deadline } => {
                let rt = &self.runtime[pod];
                let idle = rt
                    .health
                    .utilization
                    .is_some_and(|u| u < s.busy_utilization)
                    && rt.health.last_probe.is_some_and(|t| t >= retiring.since);
                if idle || now >= deadline {
                    if !idle {
                        warn!(%pod, "drain deadline passed while busy; terminating");
                        self.ctx.metrics.reconcile_failure("drain_timeout");
                    }
                    self.set_phase(pod, RetirePhase::Terminate);
                } else if let Some(target) = target {
                    if rt
                        .health
                        .probe_due(now, s.health_interval.min(Duration::from_secs(5)))
                    {
                        if let Some(rt) = self.runtime.get_mut(pod) {
                            rt.health.last_probe = Some(now);
                        }
                        self.spawn_probe(key, pod.clone(), target, now);
                    }
                }
            }
            RetirePhase::WaitCheckpoint {
                deadline,
                jobs,
                since,
            } => {
                let store = self.ctx.checkpoints.clone();
                match (store, target) {
                    _ if now >= deadline => {
                        warn!(%pod, ?jobs, "drain deadline passed without every checkpoint; terminating");
                        self.ctx.metrics.checkpoint_missed.inc_by(jobs.len() as u64);
                        self.set_phase(pod, RetirePhase::Terminate);
                    }
                    (Some(store), Some(target)) => {
                        let shell = self.ctx.shell.clone();
                        let p = pod.clone();
                        self.busy.insert(pod.clone());
                        self.ops.spawn(async move {
                            OpResult {
                                outcome: Outcome::Checkpoints(
                                    ops::pending_checkpoints(
                                        shell,
                                        store,
                                        p.clone(),
                                        target,
                                        jobs,
                                        since,
                                        s.ssh_timeout,
                                    )
                                    .await,
                                ),
                                pod: p,
                                claim: Some(key),
                                started: now,
                            }
                        });
                    }
                    // No store, or the pod is gone from the listing: nothing more to wait for.
                    _ => self.set_phase(pod, RetirePhase::Terminate),
                }
            }
            RetirePhase::Terminate => self.spawn_terminate(Some(key), pod.clone(), now),
            RetirePhase::Confirm => self.spawn_confirm(Some(key), pod.clone(), now),
        }
    }

    fn advance_retiring_stray(&mut self, pod: PodId, retiring: Retiring, now: Timestamp) {
        match retiring.phase {
            RetirePhase::Confirm => self.spawn_confirm(None, pod, now),
            _ => self.spawn_terminate(None, pod, now),
        }
    }

    fn spawn_terminate(&mut self, claim: Option<ClaimKey>, pod: PodId, now: Timestamp) {
        self.spawn_provider_step(claim, pod, now, ProviderStep::Terminate);
    }

    fn spawn_confirm(&mut self, claim: Option<ClaimKey>, pod: PodId, now: Timestamp) {
        self.spawn_provider_step(claim, pod, now, ProviderStep::LookUp);
    }

    /// Runs one provider call about `pod` as a step.
    fn spawn_provider_step(
        &mut self,
        claim: Option<ClaimKey>,
        pod: PodId,
        now: Timestamp,
        step: ProviderStep,
    ) {
        let (provider, metrics, timeout) = (
            self.ctx.provider.clone(),
            self.ctx.metrics.clone(),
            self.ctx.settings.provider_timeout,
        );
        self.busy.insert(pod.clone());
        self.ops.spawn(async move {
            let outcome = match step {
                ProviderStep::Terminate => Outcome::Terminated(
                    ops::terminate(provider, metrics, pod.clone(), timeout).await,
                ),
                ProviderStep::LookUp => {
                    Outcome::Looked(ops::look_up(provider, metrics, pod.clone(), timeout).await)
                }
            };
            OpResult {
                outcome,
                pod,
                claim,
                started: now,
            }
        });
    }

    fn set_phase(&mut self, pod: &PodId, phase: RetirePhase) {
        if let Some(r) = self.runtime.get_mut(pod).and_then(|r| r.retiring.as_mut()) {
            r.phase = phase;
        } else if let Some(r) = self.strays.get_mut(pod) {
            r.phase = phase;
        }
    }

    /// Applies a finished step.
    fn apply(&mut self, result: OpResult) {
        let now = self.ctx.clock.now();
        let OpResult {
            pod,
            claim,
            started,
            outcome,
        } = result;
        self.busy.remove(&pod);
        let mut errors = Vec::new();
        match outcome {
            Outcome::Join(join) => {
                let Some(rt) = self.runtime.get_mut(&pod) else {
                    return;
                };
                match join {
                    JoinOutcome::Joined => {
                        info!(%pod, "joined: bootstrapped and GPUs checked");
                        rt.join = JoinState::Joined;
                        rt.last_error = None;
                        rt.backoff.reset();
                        rt.health.ok(now, 0.0);
                        rt.health.last_probe = Some(now);
                        // Idleness counts from here: it could not work before it joined.
                        rt.last_busy_at = Some(now);
                        if let Some(t) = rt.join_started {
                            self.ctx
                                .metrics
                                .join_seconds
                                .observe(now.saturating_since(t).as_secs_f64());
                        }
                        if let Some(key) = claim {
                            self.update_claim(key, &mut errors, |c| c.joined = true);
                        }
                    }
                    JoinOutcome::InProgress => {
                        rt.join = JoinState::WaitingForSsh;
                        rt.last_error = Some("bootstrap still in progress".into());
                        rt.backoff.fail(now);
                    }
                    JoinOutcome::Unreachable(e) => {
                        debug!(%pod, error = %e, "SSH not reachable yet");
                        rt.join = JoinState::WaitingForSsh;
                        rt.last_error = Some(e.to_string());
                        rt.backoff.fail(now);
                    }
                    JoinOutcome::Failed(reason) => {
                        warn!(%pod, %reason, "join failed; the pod is replaced");
                        self.ctx.metrics.reconcile_failure("join");
                        rt.join = JoinState::Failed { reason };
                    }
                }
            }
            Outcome::Probe(result) => {
                let busy_at = self.ctx.settings.busy_utilization;
                let Some(rt) = self.runtime.get_mut(&pod) else {
                    return;
                };
                self.ctx
                    .metrics
                    .health_probe_seconds
                    .observe(now.saturating_since(started).as_secs_f64());
                match result {
                    Ok(util) => {
                        rt.health.ok(now, util);
                        if util >= busy_at {
                            rt.last_busy_at = Some(now);
                        }
                        // A drained pod that went idle moves on at the next tick.
                    }
                    Err(e) => {
                        debug!(%pod, error = %e, "health probe failed");
                        rt.health.failed(now, e);
                    }
                }
            }
            Outcome::Drained(result) => {
                let timeout = self.ctx.settings.drain_timeout;
                let since = self
                    .runtime
                    .get(&pod)
                    .and_then(|r| r.retiring.as_ref())
                    .map_or(started, |r| r.since);
                match result {
                    Ok(jobs) if self.ctx.checkpoints.is_some() && !jobs.is_empty() => {
                        info!(%pod, ?jobs, "drained; waiting for the jobs' checkpoints");
                        self.set_phase(
                            &pod,
                            RetirePhase::WaitCheckpoint {
                                deadline: now.plus(timeout),
                                jobs,
                                since,
                            },
                        )
                    }
                    Ok(_) => self.set_phase(
                        &pod,
                        RetirePhase::WaitIdle {
                            deadline: now.plus(timeout),
                        },
                    ),
                    Err(e) => {
                        warn!(%pod, error = %e, "drain failed; terminating without it");
                        self.set_phase(&pod, RetirePhase::Terminate);
                    }
                }
            }
            Outcome::Checkpoints(pending) => {
                if pending.is_empty() {
                    info!(%pod, "every job checkpointed and verified (or finished); terminating");
                    self.set_phase(&pod, RetirePhase::Terminate);
                } else if let Some(RetirePhase::WaitCheckpoint { jobs, .. }) = self
                    .runtime
                    .get_mut(&pod)
                    .and_then(|r| r.retiring.as_mut())
                    .map(|r| &mut r.phase)
                {
                    *jobs = pending;
                }
            }
            Outcome::Terminated(result) => match result {
                Ok(()) => self.set_phase(&pod, RetirePhase::Confirm),
                Err(e) => {
                    warn!(%pod, error = %e, "terminate failed; retried");
                    self.ctx.metrics.reconcile_failure("terminate");
                    if let Some(rt) = self.runtime.get_mut(&pod) {
                        rt.backoff.fail(now);
                    }
                }
            },
            Outcome::Looked(result) => match result {
                Ok(Some(p)) if p.state != PodState::Terminated => {
                    // Still there: a terminate that did not take (or a vanished pod that is back).
                    let retiring = self.runtime.get(&pod).is_some_and(|r| r.retiring.is_some())
                        || self.strays.contains_key(&pod);
                    if retiring {
                        self.set_phase(&pod, RetirePhase::Terminate);
                    } else if let Some(key) = claim {
                        self.update_claim(key, &mut errors, |c| c.missing_since = None);
                    }
                }
                Ok(_) => {
                    // Gone for good.
                    let reason = self
                        .runtime
                        .get(&pod)
                        .and_then(|r| r.retiring.as_ref())
                        .or_else(|| self.strays.get(&pod))
                        .map(|r| r.reason.label())
                        .unwrap_or("vanished");
                    info!(%pod, reason, "pod gone");
                    self.ctx.metrics.reconcile_termination(reason);
                    self.runtime.remove(&pod);
                    self.strays.remove(&pod);
                    self.ctx.shell.forget(pod.as_str());
                    if let Some(key) = claim {
                        self.remove_claim(key, &mut errors);
                    }
                }
                Err(e) => {
                    debug!(%pod, error = %e, "lookup failed; retried");
                    if let Some(rt) = self.runtime.get_mut(&pod) {
                        rt.backoff.fail(now);
                    }
                }
            },
        }
        for e in errors {
            warn!("{e}");
        }
    }

    fn update_claim(
        &mut self,
        key: ClaimKey,
        errors: &mut Vec<String>,
        f: impl FnOnce(&mut Claim),
    ) {
        let Some(c) = self.claims.get_mut(&key) else {
            return;
        };
        let before = c.clone();
        f(c);
        if *c != before {
            if let Err(e) = self.ctx.claims.update(c) {
                // Memory keeps the change; the store catches up at the next update.
                errors.push(format!("claim store: {e}"));
                self.ctx.metrics.reconcile_failure("claim_store");
            }
        }
    }

    fn remove_claim(&mut self, key: ClaimKey, errors: &mut Vec<String>) {
        match self.ctx.claims.remove(key) {
            Ok(()) => {
                self.claims.remove(&key);
            }
            Err(e) => {
                errors.push(format!("claim store: {e}"));
                self.ctx.metrics.reconcile_failure("claim_store");
            }
        }
    }

    /// Metrics after a tick: fleet by state, spend, claims, unavailable markets.
    fn account(&mut self, now: Timestamp) {
        let m = &self.ctx.metrics;
        let view = self.view(now);
        let rate = view.usd_per_hour();
        if let Some(last) = self.last_spend_at {
            m.spend_usd
                .inc_by(rate.dollars() * now.saturating_since(last).as_secs_f64() / 3600.0);
        }
        self.last_spend_at = Some(now);
        m.usd_per_hour.set(rate.dollars());
        m.claims_open.set(self.claims.len() as i64);
        m.unavailable_offers
            .set(self.unavailable.marked(now).count() as i64);
        m.set_pods_by_state(view.pods.iter().map(|p| p.state.as_str()));
        let longest_idle = self
            .fleet(now)
            .iter()
            .filter_map(|e| e.idle_for)
            .max()
            .unwrap_or_default();
        m.max_idle_seconds.set(longest_idle.as_secs_f64());
    }

    fn fleet(&self, now: Timestamp) -> Vec<FleetEntry> {
        let mut out = Vec::new();
        for c in self.claims.values() {
            let listed = c
                .pod
                .as_ref()
                .and_then(|id| self.last_listing.iter().find(|p| &p.id == id));
            let rt = c.pod.as_ref().and_then(|id| self.runtime.get(id));
            out.push(FleetEntry {
                claim: Some(c.key),
                pod: c.pod.clone(),
                state: match (listed, &c.pod) {
                    (Some(p), _) => p.state.to_string(),
                    (None, None) => "CLAIMED".into(),
                    // Terminated and no longer listed: only the confirmation is left.
                    (None, Some(_)) if rt.is_some_and(|r| r.retiring.is_some()) => {
                        "TERMINATED".into()
                    }
                    // Created after the last listing was read.
                    (None, Some(_)) if c.missing_since.is_none() => "CREATED".into(),
                    (None, Some(_)) => "MISSING".into(),
                },
                market: Some(c.market.clone()),
                usd_per_hour: c.usd_per_hour,
                join: rt.map(|r| r.join.clone()),
                ready: rt.is_some_and(PodRuntime::is_ready),
                utilization: rt.and_then(|r| r.health.utilization),
                idle_for: rt.map(|r| {
                    now.saturating_since(r.last_busy_at.unwrap_or(c.created_at).max(c.created_at))
                }),
                retiring: rt.and_then(|r| r.retiring.clone()),
                last_error: rt.and_then(|r| r.last_error.clone().or(r.health.last_error.clone())),
                failures: rt.map_or(0, |r| r.backoff.failures),
            });
        }
        for (pod, retiring) in &self.strays {
            let listed = self.last_listing.iter().find(|p| &p.id == pod);
            out.push(FleetEntry {
                claim: None,
                pod: Some(pod.clone()),
                state: listed.map_or("MISSING".into(), |p| p.state.to_string()),
                market: None,
                usd_per_hour: listed.map_or(Usd(0.0), |p| p.usd_per_hour),
                join: None,
                ready: false,
                utilization: None,
                idle_for: None,
                retiring: Some(retiring.clone()),
                last_error: None,
                failures: 0,
            });
        }
        out
    }
}

/// A provider call run as a step.
#[derive(Debug, Clone, Copy)]
enum ProviderStep {
    Terminate,
    LookUp,
}

/// The planner's id for a claim whose pod is not known yet.
fn claim_pod_id(key: ClaimKey) -> PodId {
    PodId(format!("claim:{}-{}", key.slot, key.generation))
}

fn parse_claim_pod_id(id: &PodId) -> Option<ClaimKey> {
    let rest = id.as_str().strip_prefix("claim:")?;
    let (slot, generation) = rest.split_once('-')?;
    Some(ClaimKey {
        slot: slot.parse().ok()?,
        generation: generation.parse().ok()?,
    })
}

/// A provider offering as a market quote.
fn quote(o: &Offering) -> Quote {
    Quote {
        gpu_type: o.gpu_type.clone(),
        secure: o.secure_usd,
        community: o.community_usd,
        secure_spot: o.secure_spot_usd,
        community_spot: o.community_spot_usd,
        minimum_bid: o.minimum_bid_usd,
        availability: match o.stock {
            Stock::None => Availability::OutOfStock,
            Stock::Unknown(_) => Availability::Unknown,
            _ => Availability::InStock,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_pod_ids_round_trip() {
        let key = ClaimKey {
            slot: 7,
            generation: 12,
        };
        assert_eq!(parse_claim_pod_id(&claim_pod_id(key)), Some(key));
        assert_eq!(parse_claim_pod_id(&PodId::from("abc")), None);
        assert_eq!(parse_claim_pod_id(&PodId::from("claim:x-1")), None);
    }

    #[test]
    fn every_termination_reason_is_counted_from_zero() {
        // `terminations` starts every reason the reconciler counts at 0 (see telemetry).
        let reasons = [
            RetireReason::Planned("surplus".into()),
            RetireReason::JoinFailed,
            RetireReason::Unhealthy,
            RetireReason::Lifetime,
            RetireReason::Duplicate,
            RetireReason::Orphan,
        ];
        for r in reasons {
            assert!(
                crate::telemetry::TERMINATION_REASONS.contains(&r.label()),
                "{}",
                r.label()
            );
        }
    }
}
