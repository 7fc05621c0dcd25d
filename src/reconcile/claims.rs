//! Claims: the reconciler's only state of its own. Before every create a claim (slot,
//! generation, deterministic name, market, price, time) is written and fsync'd, because RunPod
//! names are not unique, a create can answer 500 after creating a billed pod, and a new pod can
//! be missing from GET/list for seconds. Everything else is re-derived from RunPod.
//!
//! Two halves: [`resolve`] is pure (claims + one listing of our pods + now → what to do about
//! each), and [`RedbClaims`] is the store (redb: one file, crash-safe commits; this module is
//! its only user). A claim counts against `max_pods` and the budget at its price from the moment
//! it is written until it is retired: an unresolved create may have bought a pod.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::decide::offers::MarketKey;
use crate::model::{PodId, PodState, Timestamp, Usd};
use crate::provider::Pod;

/// A slot and one of its generations: the identity of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClaimKey {
    /// The slot (0-based; at most one live pod per slot).
    pub slot: u32,
    /// The generation within the slot (each new claim on a slot gets the next one).
    pub generation: u32,
}

impl std::fmt::Display for ClaimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {} gen {}", self.slot, self.generation)
    }
}

/// Where a claim is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimStage {
    /// Written; the create was sent or is about to be, and no pod is bound yet.
    Launching,
    /// Its pod is known.
    Bound,
    /// Being drained, then terminated.
    Retiring,
}

/// One claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// Identity.
    pub key: ClaimKey,
    /// The pod name asked for (without the provider's owner prefix).
    pub name: String,
    /// Where it is bought.
    pub market: MarketKey,
    /// GPUs in the pod.
    pub gpus: u32,
    /// What the pod costs per hour (the bid for spot): what the budget counts.
    pub usd_per_hour: Usd,
    /// Spot bid per GPU-hour, when spot.
    pub bid_per_gpu: Option<Usd>,
    /// Allowed data centers.
    pub data_centers: Vec<String>,
    /// When the claim was written.
    pub created_at: Timestamp,
    /// Stage.
    pub stage: ClaimStage,
    /// The pod, once known.
    pub pod: Option<PodId>,
    /// When its bound pod was first missing from a listing (listing lag or gone).
    pub missing_since: Option<Timestamp>,
    /// The bootstrap has completed on the pod.
    pub joined: bool,
}

impl Claim {
    /// True for a claim whose create may or may not have bought a pod.
    pub fn is_unresolved(&self) -> bool {
        self.pod.is_none()
    }
}

/// The deterministic pod name of a claim (the provider adds its owner prefix).
pub fn pod_name(cluster: &str, key: ClaimKey) -> String {
    format!("{cluster}-{}-{}", key.slot, key.generation)
}

/// How long to wait on listings before concluding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClaimTiming {
    /// An unresolved claim whose pod has not shown up this long after it was written is retired
    /// (its slot gets a new generation). Longer than RunPod's listing lag.
    pub resolve_timeout: Duration,
    /// A bound pod missing from listings this long is looked up once more, then forgotten.
    pub vanish_window: Duration,
    /// A pod of ours that no claim explains is terminated after this long.
    pub orphan_grace: Duration,
}

/// What to do about claims and listed pods after one listing.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// An unresolved claim's pod showed up: bind it.
    Adopt {
        /// The claim.
        key: ClaimKey,
        /// Its pod.
        pod: PodId,
    },
    /// An unresolved claim whose pod never showed up: drop it.
    Retire {
        /// The claim.
        key: ClaimKey,
    },
    /// A bound pod is missing from the listing (first noticed now).
    Missing {
        /// The claim.
        key: ClaimKey,
    },
    /// A bound pod that was missing is listed again.
    Found {
        /// The claim.
        key: ClaimKey,
    },
    /// A bound pod has been missing past the vanish window: confirm with a lookup, then drop the
    /// claim (its work resumes elsewhere).
    Vanished {
        /// The claim.
        key: ClaimKey,
        /// Its pod.
        pod: PodId,
    },
    /// A live pod carrying a claimed name but not the claim's pod (a duplicate create): it must
    /// go at once, a slot never has two live pods.
    Duplicate {
        /// The pod.
        pod: PodId,
    },
    /// A live pod of ours that no claim explains, past the grace period.
    Orphan {
        /// The pod.
        pod: PodId,
    },
}

/// Resolves claims against one complete listing of our pods. `first_seen` tells when each
/// listed pod was first seen (for the orphan grace). Pure.
pub fn resolve(
    claims: &[Claim],
    pods: &[Pod],
    name_prefix: &str,
    first_seen: &BTreeMap<PodId, Timestamp>,
    timing: &ClaimTiming,
    now: Timestamp,
) -> Vec<Resolution> {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.state != PodState::Terminated)
        .collect();
    let bound: BTreeSet<&PodId> = claims.iter().filter_map(|c| c.pod.as_ref()).collect();
    let mut out = Vec::new();
    let mut explained: BTreeSet<&PodId> = bound.clone();
    let mut adopted: BTreeSet<&PodId> = BTreeSet::new();

    for claim in claims {
        let full_name = format!("{name_prefix}{}", claim.name);
        let named: Vec<&&Pod> = live.iter().filter(|p| p.name == full_name).collect();
        match &claim.pod {
            None => {
                // The oldest unbound pod with the name is the one the create bought.
                let candidate = named
                    .iter()
                    .filter(|p| !bound.contains(&p.id) && !adopted.contains(&p.id))
                    .min_by_key(|p| (p.created_at, p.id.clone()));
                match candidate {
                    Some(p) => {
                        adopted.insert(&p.id);
                        explained.insert(&p.id);
                        out.push(Resolution::Adopt {
                            key: claim.key,
                            pod: p.id.clone(),
                        });
                    }
                    None if now.saturating_since(claim.created_at) >= timing.resolve_timeout => {
                        out.push(Resolution::Retire { key: claim.key })
                    }
                    None => {}
                }
            }
            Some(id) => {
                let listed = live.iter().any(|p| &p.id == id);
                match (listed, claim.missing_since) {
                    (true, Some(_)) => out.push(Resolution::Found { key: claim.key }),
                    (false, None) => out.push(Resolution::Missing { key: claim.key }),
                    (false, Some(since)) if now.saturating_since(since) >= timing.vanish_window => {
                        out.push(Resolution::Vanished {
                            key: claim.key,
                            pod: id.clone(),
                        })
                    }
                    _ => {}
                }
            }
        }
        // Any other live pod with this name is a second buy for the slot.
        for p in &named {
            if Some(&p.id) != claim.pod.as_ref()
                && !adopted.contains(&p.id)
                && !bound.contains(&p.id)
            {
                explained.insert(&p.id);
                out.push(Resolution::Duplicate { pod: p.id.clone() });
            }
        }
    }
    for p in &live {
        if explained.contains(&p.id) {
            continue;
        }
        let seen = first_seen.get(&p.id).copied().unwrap_or(now);
        if now.saturating_since(seen) >= timing.orphan_grace {
            out.push(Resolution::Orphan { pod: p.id.clone() });
        }
    }
    dedup_duplicates(out)
}

/// A pod reported as a duplicate of several claims is reported once.
fn dedup_duplicates(out: Vec<Resolution>) -> Vec<Resolution> {
    let mut seen = BTreeSet::new();
    out.into_iter()
        .filter(|r| match r {
            Resolution::Duplicate { pod } => seen.insert(pod.clone()),
            _ => true,
        })
        .collect()
}

/// A claim-store failure.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The store file cannot be opened (missing directory, no permission, another writer).
    #[error("claim store {path}: {detail}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What failed and what to check.
        detail: String,
    },
    /// A read or a commit failed.
    #[error("claim store: {0}")]
    Storage(String),
    /// A stored claim cannot be read back (written by an incompatible version).
    #[error("claim store: unreadable claim {key}: {detail}")]
    Corrupt {
        /// The claim's key.
        key: String,
        /// The decoding error.
        detail: String,
    },
}

impl ClaimError {
    /// Storage hiccups may pass; an unopenable or corrupt store will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClaimError::Storage(_))
    }
}

/// Where claims are kept. One real implementation: [`RedbClaims`].
pub trait ClaimStore: Send + Sync {
    /// Every open claim, by key.
    fn load(&self) -> Result<Vec<Claim>, ClaimError>;
    /// Writes a new claim on `slot` with the slot's next generation, durably, in one
    /// transaction; `build` makes the claim from its key.
    fn create(&self, slot: u32, build: &dyn Fn(ClaimKey) -> Claim) -> Result<Claim, ClaimError>;
    /// Replaces a claim (durably).
    fn update(&self, claim: &Claim) -> Result<(), ClaimError>;
    /// Drops a claim (durably). Dropping a missing claim is not an error.
    fn remove(&self, key: ClaimKey) -> Result<(), ClaimError>;
}

/// Claims held in memory only: a copy of a store read by another process, for dry runs
/// (`plan`). Writes change the copy, never the store.
#[derive(Debug, Default)]
pub struct MemoryClaims {
    claims: std::sync::Mutex<BTreeMap<ClaimKey, Claim>>,
}

impl MemoryClaims {
    /// A copy of `claims`.
    pub fn new(claims: Vec<Claim>) -> Self {
        MemoryClaims {
            claims: std::sync::Mutex::new(claims.into_iter().map(|c| (c.key, c)).collect()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ClaimKey, Claim>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClaimStore for MemoryClaims {
    fn load(&self) -> Result<Vec<Claim>, ClaimError> {
        Ok(self.lock().values().cloned().collect())
    }

    fn create(&self, slot: u32, build: &dyn Fn(ClaimKey) -> Claim) -> Result<Claim, ClaimError> {
        let mut claims = self.lock();
        let generation = claims
            .keys()
            .filter(|k| k.slot == slot)
            .map(|k| k.generation + 1)
            .max()
            .unwrap_or(0);
        let claim = build(ClaimKey { slot, generation });
        claims.insert(claim.key, claim.clone());
        Ok(claim)
    }

    fn update(&self, claim: &Claim) -> Result<(), ClaimError> {
        self.lock().insert(claim.key, claim.clone());
        Ok(())
    }

    fn remove(&self, key: ClaimKey) -> Result<(), ClaimError> {
        self.lock().remove(&key);
        Ok(())
    }
}

/// Claims, JSON, by (slot, generation).
const CLAIMS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("claims");
/// The last generation used per slot (never reused, even after its claim is gone).
const GENERATIONS: TableDefinition<u32, u32> = TableDefinition::new("generations");

/// The claim store in one redb file: every commit is durable (fsync'd) before it returns. The
/// file is opened for one writing process; other processes may read it (`pods list`).
pub struct RedbClaims {
    db: redb::Database,
}

impl std::fmt::Debug for RedbClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbClaims")
    }
}

fn storage(e: impl std::fmt::Display) -> ClaimError {
    ClaimError::Storage(e.to_string())
}

impl RedbClaims {
    /// The store's file inside `state_dir`.
    pub fn file(state_dir: &Path) -> PathBuf {
        state_dir.join("claims.redb")
    }

    /// Opens (creating when missing) the store in `state_dir` for writing. Fails when another
    /// process writes it: two reconcilers on one store would buy pods twice.
    pub fn open(state_dir: &Path) -> Result<RedbClaims, ClaimError> {
        let path = Self::file(state_dir);
        let open_error = |detail: String| ClaimError::Open {
            path: path.clone(),
            detail,
        };
        std::fs::create_dir_all(state_dir).map_err(|e| {
            open_error(format!(
                "cannot create the state directory: {e}; set reconcile.state_dir to a writable directory"
            ))
        })?;
        let db = redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
            .create(&path)
            .map_err(|e| {
                open_error(format!(
                    "{e}; is another runpod-autoscaler running on this state directory?"
                ))
            })?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(CLAIMS).map_err(storage)?;
        txn.open_table(GENERATIONS).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(RedbClaims { db })
    }

    /// Reads the open claims of a store another process may be writing.
    pub fn read(state_dir: &Path) -> Result<Vec<Claim>, ClaimError> {
        let path = Self::file(state_dir);
        let db = redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
            .open_read_only(&path)
            .map_err(|e| ClaimError::Open {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        load_from(&db)
    }
}

fn load_from(db: &impl ReadableDatabase) -> Result<Vec<Claim>, ClaimError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = match txn.open_table(CLAIMS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(storage(e)),
    };
    let mut out = Vec::new();
    for entry in table.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        let (slot, generation) = k.value();
        let claim: Claim = serde_json::from_slice(v.value()).map_err(|e| ClaimError::Corrupt {
            key: format!("{slot}/{generation}"),
            detail: e.to_string(),
        })?;
        out.push(claim);
    }
    Ok(out)
}

impl ClaimStore for RedbClaims {
    fn load(&self) -> Result<Vec<Claim>, ClaimError> {
        load_from(&self.db)
    }

    fn create(&self, slot: u32, build: &dyn Fn(ClaimKey) -> Claim) -> Result<Claim, ClaimError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let claim = {
            let mut generations = txn.open_table(GENERATIONS).map_err(storage)?;
            let next = generations
                .get(slot)
                .map_err(storage)?
                .map_or(0, |g| g.value().saturating_add(1));
            generations.insert(slot, next).map_err(storage)?;
            let claim = build(ClaimKey {
                slot,
                generation: next,
            });
            let bytes = serde_json::to_vec(&claim).map_err(storage)?;
            let mut claims = txn.open_table(CLAIMS).map_err(storage)?;
            claims
                .insert((slot, next), bytes.as_slice())
                .map_err(storage)?;
            claim
        };
        txn.commit().map_err(storage)?;
        Ok(claim)
    }

    fn update(&self, claim: &Claim) -> Result<(), ClaimError> {
        let bytes = serde_json::to_vec(claim).map_err(storage)?;
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut claims = txn.open_table(CLAIMS).map_err(storage)?;
            claims
                .insert((claim.key.slot, claim.key.generation), bytes.as_slice())
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    fn remove(&self, key: ClaimKey) -> Result<(), ClaimError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut claims = txn.open_table(CLAIMS).map_err(storage)?;
            claims.remove((key.slot, key.generation)).map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }
}

#[cfg(test)]
mod tests;
