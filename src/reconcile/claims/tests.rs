//! Claim store (real redb files in temporary directories) and pure resolution tests.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::model::{Cloud, GpuTypeId};

const NOW: Timestamp = Timestamp::from_secs(1_000_000);
const TIMING: ClaimTiming = ClaimTiming {
    resolve_timeout: Duration::from_secs(60),
    vanish_window: Duration::from_secs(30),
    orphan_grace: Duration::from_secs(180),
};
const PREFIX: &str = "rpa-";

fn claim(key: ClaimKey, pod: Option<&str>, age: u64) -> Claim {
    Claim {
        key,
        name: pod_name("c1", key),
        market: MarketKey {
            gpu_type: GpuTypeId::from("NVIDIA RTX A5000"),
            cloud: Cloud::Secure,
            spot: false,
        },
        gpus: 1,
        usd_per_hour: Usd(0.26),
        bid_per_gpu: None,
        data_centers: vec![],
        created_at: NOW.minus(Duration::from_secs(age)),
        stage: if pod.is_some() {
            ClaimStage::Bound
        } else {
            ClaimStage::Launching
        },
        pod: pod.map(PodId::from),
        missing_since: None,
        joined: false,
    }
}

fn key(slot: u32, generation: u32) -> ClaimKey {
    ClaimKey { slot, generation }
}

fn pod(id: &str, name: &str, state: PodState) -> Pod {
    Pod {
        id: PodId::from(id),
        name: name.to_owned(),
        state,
        gpu_type: Some(GpuTypeId::from("NVIDIA RTX A5000")),
        gpu_count: 1,
        usd_per_hour: Usd(0.26),
        created_at: Some(NOW.minus(Duration::from_secs(30))),
        ssh: None,
        env: BTreeMap::new(),
    }
}

#[test]
fn the_store_survives_reopening_and_never_reuses_a_generation() {
    let dir = tempfile::tempdir().unwrap();
    let build = |k: ClaimKey| claim(k, None, 0);
    {
        let store = RedbClaims::open(dir.path()).unwrap();
        let a = store.create(3, &build).unwrap();
        let b = store.create(3, &build).unwrap();
        assert_eq!((a.key, b.key), (key(3, 0), key(3, 1)));
        assert_eq!(a.name, "c1-3-0");
        let mut bound = b.clone();
        bound.pod = Some(PodId::from("p1"));
        bound.stage = ClaimStage::Bound;
        store.update(&bound).unwrap();
        store.remove(a.key).unwrap();
        store.remove(a.key).unwrap();
    }
    // A new process (the store reopened) sees exactly what was committed.
    let store = RedbClaims::open(dir.path()).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].key, key(3, 1));
    assert_eq!(loaded[0].pod, Some(PodId::from("p1")));
    // Generation 0 and 1 of slot 3 are used up, even though generation 0 is gone.
    assert_eq!(store.create(3, &build).unwrap().key, key(3, 2));
    assert_eq!(store.create(0, &build).unwrap().key, key(0, 0));
}

#[test]
fn one_writer_per_store_and_readers_alongside() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbClaims::open(dir.path()).unwrap();
    store.create(0, &|k| claim(k, None, 0)).unwrap();
    // A second writer on the same state directory is refused with what to check.
    let err = RedbClaims::open(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("another runpod-autoscaler"),
        "{err}"
    );
    assert!(!err.is_retryable());
    // A reader (the `pods list` command) sees the committed claims meanwhile.
    let read = RedbClaims::read(dir.path()).unwrap();
    assert_eq!(read.len(), 1);
}

#[test]
fn an_unwritable_state_directory_is_a_clear_error() {
    let file = tempfile::NamedTempFile::new().unwrap();
    // A regular file where a directory should be.
    let err = RedbClaims::open(&file.path().join("state")).unwrap_err();
    assert!(err.to_string().contains("reconcile.state_dir"), "{err}");
}

#[test]
fn resolution_table() {
    let first_seen = |entries: &[(&str, u64)]| -> BTreeMap<PodId, Timestamp> {
        entries
            .iter()
            .map(|(id, age)| (PodId::from(*id), NOW.minus(Duration::from_secs(*age))))
            .collect()
    };
    let missing = |mut c: Claim, secs: u64| {
        c.missing_since = Some(NOW.minus(Duration::from_secs(secs)));
        c
    };
    type Case = (
        &'static str,
        Vec<Claim>,
        Vec<Pod>,
        BTreeMap<PodId, Timestamp>,
        Vec<Resolution>,
    );
    let cases: Vec<Case> = vec![
        (
            "an unresolved claim adopts the pod with its name",
            vec![claim(key(0, 0), None, 5)],
            vec![pod("p1", "rpa-c1-0-0", PodState::Provisioning)],
            first_seen(&[("p1", 0)]),
            vec![Resolution::Adopt {
                key: key(0, 0),
                pod: PodId::from("p1"),
            }],
        ),
        (
            "within the resolve timeout an unlisted claim waits (listing lag)",
            vec![claim(key(0, 0), None, 59)],
            vec![],
            first_seen(&[]),
            vec![],
        ),
        (
            "past the resolve timeout it is retired",
            vec![claim(key(0, 0), None, 60)],
            vec![],
            first_seen(&[]),
            vec![Resolution::Retire { key: key(0, 0) }],
        ),
        (
            "two pods with one claimed name: the oldest is adopted, the other is a duplicate",
            vec![claim(key(1, 4), None, 5)],
            vec![
                {
                    let mut p = pod("late", "rpa-c1-1-4", PodState::Running);
                    p.created_at = Some(NOW.minus(Duration::from_secs(1)));
                    p
                },
                pod("early", "rpa-c1-1-4", PodState::Running),
            ],
            first_seen(&[("late", 0), ("early", 0)]),
            vec![
                Resolution::Adopt {
                    key: key(1, 4),
                    pod: PodId::from("early"),
                },
                Resolution::Duplicate {
                    pod: PodId::from("late"),
                },
            ],
        ),
        (
            "a bound claim with a second live pod of its name: the stranger goes",
            vec![claim(key(2, 0), Some("mine"), 500)],
            vec![
                pod("mine", "rpa-c1-2-0", PodState::Running),
                pod("twin", "rpa-c1-2-0", PodState::Starting),
            ],
            first_seen(&[("mine", 400), ("twin", 0)]),
            vec![Resolution::Duplicate {
                pod: PodId::from("twin"),
            }],
        ),
        (
            "a bound pod missing from the listing is noted, then forgotten after the window",
            vec![
                claim(key(0, 0), Some("gone"), 500),
                missing(claim(key(1, 0), Some("gone2"), 500), 10),
                missing(claim(key(2, 0), Some("gone3"), 500), 30),
            ],
            vec![],
            first_seen(&[]),
            vec![
                Resolution::Missing { key: key(0, 0) },
                Resolution::Vanished {
                    key: key(2, 0),
                    pod: PodId::from("gone3"),
                },
            ],
        ),
        (
            "a missing pod that is listed again is found",
            vec![missing(claim(key(0, 0), Some("back"), 500), 10)],
            vec![pod("back", "rpa-c1-0-0", PodState::Running)],
            first_seen(&[("back", 400)]),
            vec![Resolution::Found { key: key(0, 0) }],
        ),
        (
            "an unexplained pod of ours is an orphan after the grace period only",
            vec![],
            vec![
                pod("new", "rpa-c1-9-9", PodState::Running),
                pod("old", "rpa-c1-8-8", PodState::Exited),
                pod("dead", "rpa-c1-7-7", PodState::Terminated),
            ],
            first_seen(&[("new", 179), ("old", 180), ("dead", 999)]),
            vec![Resolution::Orphan {
                pod: PodId::from("old"),
            }],
        ),
        (
            "a terminated pod with the claimed name is not adopted",
            vec![claim(key(0, 0), None, 5)],
            vec![pod("t", "rpa-c1-0-0", PodState::Terminated)],
            first_seen(&[("t", 0)]),
            vec![],
        ),
    ];
    for (name, claims, pods, seen, want) in cases {
        let got = resolve(&claims, &pods, PREFIX, &seen, &TIMING, NOW);
        assert_eq!(got, want, "{name}");
    }
}

prop_compose! {
    fn arb_world()(
        claims in proptest::collection::vec((0u32..6, 0u32..3, proptest::option::of(0usize..8), 0u64..120, proptest::option::of(0u64..60)), 0..6),
        pods in proptest::collection::vec((0usize..8, 0u32..6, 0u32..3, 0u8..4, 0u64..400), 0..8),
    ) -> (Vec<Claim>, Vec<Pod>, BTreeMap<PodId, Timestamp>) {
        let mut seen_keys = std::collections::BTreeSet::new();
        let mut bound_pods = std::collections::BTreeSet::new();
        let claims: Vec<Claim> = claims
            .into_iter()
            .filter(|(s, g, ..)| seen_keys.insert((*s, *g)))
            .map(|(s, g, pod_ix, age, missing)| {
                let pod_ix = pod_ix.filter(|i| bound_pods.insert(*i));
                let mut c = claim(key(s, g), None, age);
                c.pod = pod_ix.map(|i| PodId(format!("p{i}")));
                c.missing_since = c.pod.as_ref().and(missing).map(|m| NOW.minus(Duration::from_secs(m)));
                c
            })
            .collect();
        let mut ids = std::collections::BTreeSet::new();
        let mut first_seen = BTreeMap::new();
        let pods = pods
            .into_iter()
            .filter(|(i, ..)| ids.insert(*i))
            .map(|(i, s, g, state, seen)| {
                let state = [PodState::Running, PodState::Provisioning, PodState::Exited, PodState::Terminated][state as usize].clone();
                let p = pod(&format!("p{i}"), &format!("rpa-c1-{s}-{g}"), state);
                first_seen.insert(p.id.clone(), NOW.minus(Duration::from_secs(seen)));
                p
            })
            .collect();
        (claims, pods, first_seen)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn resolution_never_double_binds_never_retires_a_listed_name_and_accounts_for_every_live_pod((claims, pods, first_seen) in arb_world()) {
        let out = resolve(&claims, &pods, PREFIX, &first_seen, &TIMING, NOW);
        let live: Vec<&Pod> = pods.iter().filter(|p| p.state != PodState::Terminated).collect();
        let mut adopted = std::collections::BTreeSet::new();
        for r in &out {
            match r {
                Resolution::Adopt { key, pod } => {
                    // Only unresolved claims adopt, only a live pod of their name, each pod once,
                    // and never a pod another claim holds.
                    let c = claims.iter().find(|c| c.key == *key).unwrap();
                    prop_assert!(c.pod.is_none());
                    let p = live.iter().find(|p| &p.id == pod).unwrap();
                    prop_assert_eq!(&p.name, &format!("{PREFIX}{}", c.name));
                    prop_assert!(adopted.insert(pod.clone()));
                    prop_assert!(!claims.iter().any(|o| o.pod.as_ref() == Some(pod)));
                }
                Resolution::Retire { key } => {
                    let c = claims.iter().find(|c| c.key == *key).unwrap();
                    prop_assert!(c.pod.is_none());
                    let name = format!("{PREFIX}{}", c.name);
                    let adoptable = |p: &&&Pod| p.name == name && !claims.iter().any(|o| o.pod.as_ref() == Some(&p.id));
                    prop_assert!(!live.iter().any(|p| adoptable(&p)), "retired a claim whose pod is listed");
                }
                Resolution::Duplicate { pod } | Resolution::Orphan { pod } => {
                    // Never a pod a claim holds or adopts.
                    prop_assert!(!claims.iter().any(|c| c.pod.as_ref() == Some(pod)));
                    let adopted_too = out.iter().any(|o| matches!(o, Resolution::Adopt { pod: a, .. } if a == pod));
                    prop_assert!(!adopted_too);
                }
                _ => {}
            }
        }
        // Every live pod is bound, adopted, a duplicate, an orphan, or an unexplained pod still
        // within its grace period.
        for p in &live {
            let reported = |r: &Resolution| matches!(r,
                Resolution::Adopt { pod, .. } | Resolution::Duplicate { pod } | Resolution::Orphan { pod } if pod == &p.id);
            let accounted = claims.iter().any(|c| c.pod.as_ref() == Some(&p.id))
                || out.iter().any(reported);
            let young = NOW.saturating_since(first_seen[&p.id]) < TIMING.orphan_grace;
            prop_assert!(accounted || young, "{:?} unaccounted", p.id);
        }
    }
}
