//! The checkpoint store against a real S3-compatible server (s3s-fs, SigV4 enforced): round
//! trips, damage detection, resumed uploads, racing writers, retention and errors.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use runpod_autoscaler::checkpoint::{
    CheckpointError, CheckpointOptions, CheckpointStore, GcOptions, GcReason, S3Store,
    TransferEvent, TransferOptions,
};
use runpod_autoscaler::model::Secret;
use support::s3::S3s;

const MIB: usize = 1024 * 1024;

/// Deterministic bytes (xorshift64*), different per seed.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Relative path → (bytes, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

/// Every file under `root` and every directory.
fn tree(root: &Path) -> (Files, Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let mut files = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                dirs.push(rel);
                stack.push(p);
            } else {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                files.insert(rel, (std::fs::read(&p).unwrap(), mode));
            }
        }
    }
    dirs.sort();
    (files, dirs)
}

async fn store(s3: &S3s, prefix: &str) -> S3Store {
    S3Store::connect(&s3.config(prefix)).await.unwrap()
}

fn opts(writer: &str) -> CheckpointOptions {
    CheckpointOptions {
        writer: writer.into(),
        ..CheckpointOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_directory_round_trips_bit_for_bit() {
    use std::os::unix::fs::PermissionsExt;
    let s3 = S3s::start().await;
    let mut cfg = s3.config("prod/ckpt");
    cfg.part_size = 8 * MIB as u64;
    let store = S3Store::connect(&cfg).await.unwrap();
    let src = tempfile::tempdir().unwrap();
    write(
        src.path(),
        "model/weights.bin",
        &pseudo_random(1, 160 * MIB),
    );
    write(
        src.path(),
        "model/optimizer.bin",
        &pseudo_random(2, 30 * MIB + 12_345),
    );
    for i in 0..40u64 {
        let len = 1_000 + (i as usize * 37_813) % 200_000;
        write(
            src.path(),
            &format!("shards/{:02}/part-{i}.json", i % 7),
            &pseudo_random(100 + i, len),
        );
    }
    write(src.path(), "empty-file", b"");
    std::fs::create_dir_all(src.path().join("logs/empty-dir")).unwrap();
    write(src.path(), "bin/run.sh", b"#!/bin/sh\necho resumed\n");
    std::fs::set_permissions(
        src.path().join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let (want_files, want_dirs) = tree(src.path());
    let total: usize = want_files.values().map(|(b, _)| b.len()).sum();
    assert!(total >= 200_000_000, "{total}");

    let mut o = opts("pod-a");
    o.meta.insert("step".into(), "1200".into());
    let out = store.checkpoint("train-1", src.path(), &o).await.unwrap();
    let m = &out.manifest;
    assert_eq!(
        (m.job.as_str(), m.seq, m.writer.as_str()),
        ("train-1", 1, "pod-a")
    );
    assert_eq!(m.total_size, total as u64);
    assert_eq!(m.meta["step"], "1200");
    assert_eq!(m.chunks.len(), total.div_ceil(8 * MIB));
    assert_eq!(out.parts_uploaded as usize, m.chunks.len());
    assert_eq!((out.parts_skipped, out.resumed_upload), (0, false));
    assert_eq!(out.bytes_uploaded, total as u64);
    let run_sh = m.files.iter().find(|f| f.path == "bin/run.sh").unwrap();
    assert_eq!(run_sh.mode & 0o777, 0o755);

    // The manifest is a plain JSON object next to the data, as any S3 client sees it.
    let raw = std::fs::read(s3.object_file("prod/ckpt/train-1/00000000000000000001/manifest.json"))
        .unwrap();
    let on_disk: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(on_disk["seq"], 1);
    assert_eq!(store.latest("train-1").await.unwrap().as_ref(), Some(m));
    store.verify(m).await.unwrap();

    // Restore next to a file of the target's own, which stays.
    let dst = tempfile::tempdir().unwrap();
    write(dst.path(), "keep.txt", b"mine");
    let got = store
        .resume("train-1", dst.path(), &TransferOptions::default())
        .await
        .unwrap();
    assert_eq!(&got, m);
    let (mut got_files, mut got_dirs) = tree(dst.path());
    assert_eq!(
        got_files.remove("keep.txt").map(|f| f.0),
        Some(b"mine".to_vec())
    );
    got_dirs.retain(|d| !d.is_empty());
    assert_eq!(got_dirs, want_dirs);
    assert_eq!(got_files.len(), want_files.len());
    for (path, (bytes, mode)) in &want_files {
        let (b, md) = &got_files[path];
        assert!(b == bytes, "{path} differs");
        assert_eq!(md, mode, "{path} mode");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_part_is_detected_and_refused() {
    let s3 = S3s::start().await;
    let store = store(&s3, "").await;
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "state.bin", &pseudo_random(7, 12 * MIB));
    let out = store
        .checkpoint("job-c", src.path(), &opts("pod-1"))
        .await
        .unwrap();
    let m = out.manifest;
    assert_eq!(m.chunks.len(), 3);
    let object = s3.object_file(&format!(
        "job-c/00000000000000000001/{}",
        m.data.as_deref().unwrap()
    ));

    // One bit flipped in the middle of part 2, on the server's disk.
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[6 * MIB + 17] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();
    let e = store.verify(&m).await.unwrap_err();
    assert!(
        matches!(e, CheckpointError::CorruptPart { part: 2, .. }),
        "{e}"
    );
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("older generation"), "{e}");

    // A resume refuses it and leaves the target as it was.
    let dst = tempfile::tempdir().unwrap();
    write(dst.path(), "keep.txt", b"mine");
    let e = store
        .resume("job-c", dst.path(), &TransferOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, CheckpointError::CorruptPart { part: 2, .. }),
        "{e}"
    );
    let (files, dirs) = tree(dst.path());
    assert_eq!(files.keys().collect::<Vec<_>>(), ["keep.txt"]);
    assert!(dirs.is_empty(), "staging left behind: {dirs:?}");

    // A truncated object is missing data.
    std::fs::write(&object, &bytes[..5 * MIB]).unwrap();
    let e = store.verify(&m).await.unwrap_err();
    assert!(matches!(e, CheckpointError::MissingObject { .. }), "{e}");
}

/// Counts uploaded parts and cancels the transfer once `cancel_after` were sent.
fn counting(cancel_after: Option<u32>) -> (TransferOptions, Arc<AtomicU32>) {
    let count = Arc::new(AtomicU32::new(0));
    let opts = TransferOptions::default();
    let (c, token) = (count.clone(), opts.cancel.clone());
    let sink = move |e: &TransferEvent| {
        if let TransferEvent::PartUploaded { .. } = e {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            if cancel_after.is_some_and(|limit| n >= limit) {
                token.cancel();
            }
        }
    };
    (
        TransferOptions {
            events: Some(Arc::new(sink)),
            ..opts
        },
        count,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_resumes_sending_only_the_missing_parts() {
    let s3 = S3s::start().await;
    let mut cfg = s3.config("r");
    cfg.parallelism = 2;
    let store = S3Store::connect(&cfg).await.unwrap();
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "a.bin", &pseudo_random(11, 23 * MIB));
    write(src.path(), "b.bin", &pseudo_random(12, 17 * MIB));

    let (transfer, sent) = counting(Some(3));
    let o = CheckpointOptions {
        writer: "pod-r".into(),
        transfer,
        ..CheckpointOptions::default()
    };
    let e = store.checkpoint("job-r", src.path(), &o).await.unwrap_err();
    assert!(matches!(e, CheckpointError::Cancelled), "{e}");
    let kept = s3.pending_parts();
    assert!(
        (3..8).contains(&kept),
        "{kept} parts on the server after cancelling at 3 of 8 ({} sent)",
        sent.load(Ordering::SeqCst)
    );
    assert_eq!(
        store.latest("job-r").await.unwrap(),
        None,
        "no manifest yet"
    );

    // The same writer again: only the missing parts are sent.
    let (transfer, sent) = counting(None);
    let o = CheckpointOptions {
        writer: "pod-r".into(),
        transfer,
        ..CheckpointOptions::default()
    };
    let out = store.checkpoint("job-r", src.path(), &o).await.unwrap();
    assert!(out.resumed_upload);
    assert_eq!(out.manifest.seq, 1);
    // A part whose body had reached the server when the upload was cancelled can still land
    // after `checkpoint` returned, so `kept` is a lower bound on what the resume finds.
    let skipped = out.parts_skipped as usize;
    assert!(
        (kept..8).contains(&skipped),
        "{skipped} parts skipped, {kept} were on the server"
    );
    assert_eq!(out.parts_uploaded as usize, 8 - skipped);
    assert_eq!(sent.load(Ordering::SeqCst) as usize, 8 - skipped);
    assert_eq!(s3.pending_parts(), 0);

    let dst = tempfile::tempdir().unwrap();
    store
        .resume("job-r", dst.path(), &TransferOptions::default())
        .await
        .unwrap();
    assert!(tree(dst.path()).0 == tree(src.path()).0);

    // A parts list that no longer matches the directory is not trusted: the next writer run
    // after a change re-sends what differs.
    let (transfer, _) = counting(Some(2));
    let o = CheckpointOptions {
        writer: "pod-r".into(),
        transfer,
        ..CheckpointOptions::default()
    };
    let _ = store.checkpoint("job-r", src.path(), &o).await.unwrap_err();
    write(src.path(), "a.bin", &pseudo_random(13, 23 * MIB));
    let out = store
        .checkpoint("job-r", src.path(), &opts("pod-r"))
        .await
        .unwrap();
    let dst = tempfile::tempdir().unwrap();
    let m = store
        .resume("job-r", dst.path(), &TransferOptions::default())
        .await
        .unwrap();
    assert_eq!(m.seq, out.manifest.seq);
    assert!(tree(dst.path()).0 == tree(src.path()).0);
}

/// Three writers checkpoint one job at the same moment, round after round. s3s-fs refuses a
/// second create of a key, but its check is not atomic with the write (simultaneous creates can
/// all "succeed"), so this also exercises the read-backs of claims and manifests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_never_share_parts() {
    let s3 = S3s::start().await;
    let mut cfg = s3.config("race");
    cfg.keep = 100;
    let first = S3Store::connect(&cfg).await.unwrap();
    // s3s-fs refuses a second create of one key (If-None-Match: *).
    assert!(first.conditional_create_supported().await.unwrap());

    let writers = ["pod-a", "pod-b", "pod-c"];
    let mut stores = Vec::new();
    let mut dirs = Vec::new();
    for (i, w) in writers.iter().enumerate() {
        stores.push(S3Store::connect(&cfg).await.unwrap());
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "state.bin",
            &pseudo_random(20 + i as u64, (5 + i) * MIB + 99),
        );
        write(d.path(), "who", w.as_bytes());
        dirs.push(d);
    }
    let options: Vec<CheckpointOptions> = writers.iter().map(|w| opts(w)).collect();
    let rounds = 3;
    let mut conflicts = 0;
    let mut seqs = Vec::new();
    for _ in 0..rounds {
        let runs = stores
            .iter()
            .zip(&dirs)
            .zip(&options)
            .map(|((s, d), o)| s.checkpoint("shared", d.path(), o));
        for r in futures_util::future::join_all(runs).await {
            let r = r.unwrap();
            conflicts += r.claim_conflicts;
            seqs.push(r.manifest.seq);
        }
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        rounds * writers.len(),
        "two writers got one generation"
    );
    // They started from the same listing each round, so they wanted the same seq.
    assert!(conflicts >= 1, "the writers never raced for a seq");

    // Every manifest restores exactly its own writer's directory.
    let complete = complete_seqs(&first, "shared").await;
    assert_eq!(complete, seqs);
    for seq in complete {
        let m = first.manifest("shared", seq).await.unwrap().unwrap();
        first.verify(&m).await.unwrap();
        let dst = tempfile::tempdir().unwrap();
        first
            .restore(&m, dst.path(), &TransferOptions::default())
            .await
            .unwrap();
        let i = writers.iter().position(|w| *w == m.writer).unwrap();
        assert!(
            tree(dst.path()).0 == tree(dirs[i].path()).0,
            "generation {seq}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_exactly_n_and_gc_collects_abandoned_uploads() {
    let s3 = S3s::start().await;
    let mut cfg = s3.config("ret");
    cfg.keep = 2;
    let store = S3Store::connect(&cfg).await.unwrap();
    let src = tempfile::tempdir().unwrap();
    for step in 1..=5u64 {
        write(src.path(), "state.bin", &pseudo_random(step, 64 * 1024));
        let mut o = opts("pod-k");
        o.meta.insert("step".into(), step.to_string());
        let out = store.checkpoint("job-k", src.path(), &o).await.unwrap();
        assert_eq!(out.manifest.seq, step);
        assert_eq!(out.pruned, usize::from(step > 2));
        let complete = complete_seqs(&store, "job-k").await;
        assert_eq!(
            complete,
            (step.saturating_sub(1).max(1)..=step).collect::<Vec<_>>()
        );
    }
    assert_eq!(store.manifest("job-k", 3).await.unwrap(), None);
    assert_eq!(
        store.latest("job-k").await.unwrap().unwrap().meta["step"],
        "5"
    );

    // An upload another writer abandoned half way.
    write(src.path(), "big.bin", &pseudo_random(9, 12 * MIB));
    let (transfer, _) = counting(Some(1));
    let o = CheckpointOptions {
        writer: "pod-gone".into(),
        transfer,
        ..CheckpointOptions::default()
    };
    store.checkpoint("job-k", src.path(), &o).await.unwrap_err();
    // Settled first, so that a part landing late cannot reappear after the abort below.
    assert!(s3.settled_pending_parts().await >= 1);
    let listed = store.list(Some("job-k")).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|g| (g.seq, g.complete))
            .collect::<Vec<_>>(),
        [(4, true), (5, true), (6, false)]
    );

    // Not old enough under the default abandon_after (a day): left alone.
    let r = store.gc(None, &GcOptions::default()).await.unwrap();
    assert!(r.removed.is_empty(), "{r:?}");
    let now = GcOptions {
        abandon_after: Some(std::time::Duration::ZERO),
        ..GcOptions::default()
    };
    let dry = store
        .gc(
            None,
            &GcOptions {
                dry_run: true,
                ..now
            },
        )
        .await
        .unwrap();
    assert_eq!(dry.removed.len(), 1);
    assert_eq!(
        (dry.removed[0].seq, dry.removed[0].reason),
        (6, GcReason::Abandoned)
    );
    assert_eq!(
        store.list(Some("job-k")).await.unwrap().len(),
        3,
        "dry run deleted"
    );
    let r = store.gc(None, &now).await.unwrap();
    assert_eq!(r.removed.len(), 1);
    assert_eq!(r.uploads_aborted, 1);
    assert_eq!(s3.pending_parts(), 0);
    let seqs: Vec<u64> = store
        .list(None)
        .await
        .unwrap()
        .iter()
        .map(|g| g.seq)
        .collect();
    assert_eq!(seqs, [4, 5]);

    // Explicit retention down to one.
    let r = store
        .gc(
            Some("job-k"),
            &GcOptions {
                keep: Some(1),
                ..GcOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        r.removed
            .iter()
            .map(|g| (g.seq, g.reason))
            .collect::<Vec<_>>(),
        [(4, GcReason::Retention)]
    );
    assert_eq!(store.list(None).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_is_wrong_and_what_to_do() {
    let s3 = S3s::start().await;

    // A wrong secret, and an unknown key.
    let mut cfg = s3.config("");
    cfg.secret_access_key = Some(Secret::new("not-the-secret"));
    let bad = S3Store::connect(&cfg).await.unwrap();
    let e = bad.latest("j").await.unwrap_err();
    assert!(matches!(e, CheckpointError::Auth { .. }), "{e}");
    assert!(!e.is_retryable());
    let msg = e.to_string();
    assert!(
        msg.contains("access_key_id") && !msg.contains("not-the-secret"),
        "{msg}"
    );
    assert!(matches!(
        bad.check().await.unwrap_err(),
        CheckpointError::Auth { .. }
    ));
    let mut cfg = s3.config("");
    cfg.access_key_id = Some("nobody".into());
    let unknown = S3Store::connect(&cfg).await.unwrap();
    let e = unknown.latest("j").await.unwrap_err();
    assert!(matches!(e, CheckpointError::Auth { .. }), "{e}");

    // A bucket that does not exist.
    let mut cfg = s3.config("");
    cfg.bucket = "no-such-bucket".into();
    let missing = S3Store::connect(&cfg).await.unwrap();
    let e = missing.latest("j").await.unwrap_err();
    assert!(matches!(e, CheckpointError::NoSuchBucket { .. }), "{e}");
    assert!(e.to_string().contains("\"no-such-bucket\"") && e.to_string().contains("aws s3 mb"));
    let e = missing.check().await.unwrap_err();
    assert!(matches!(e, CheckpointError::NoSuchBucket { .. }), "{e}");
    store(&s3, "").await.check().await.unwrap();

    // Nothing listening.
    let mut cfg = s3.config("");
    cfg.endpoint = Some(format!("http://127.0.0.1:{}", support::free_port()));
    let down = S3Store::connect(&cfg).await.unwrap();
    let e = down.latest("j").await.unwrap_err();
    assert!(matches!(e, CheckpointError::Unreachable { .. }), "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("checkpoint.endpoint"), "{e}");

    // Bad input, nothing to resume, bad settings.
    let ok = store(&s3, "").await;
    for job in ["../etc", "a/b", "", ".hidden"] {
        let e = ok.latest(job).await.unwrap_err();
        assert!(
            matches!(e, CheckpointError::InvalidJob { .. }),
            "{job:?}: {e}"
        );
    }
    let dst = tempfile::tempdir().unwrap();
    let e = ok
        .resume("never-written", dst.path(), &TransferOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, CheckpointError::NothingToResume { .. }), "{e}");
    assert!(e.to_string().contains("never-written"), "{e}");
    let e = ok
        .checkpoint("j", &dst.path().join("nope"), &opts("w"))
        .await
        .unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
    let mut cfg = s3.config("");
    cfg.part_size = 1024;
    let e = S3Store::connect(&cfg).await.unwrap_err();
    assert!(e.to_string().contains("checkpoint.part_size"), "{e}");
    let debug = format!("{ok:?}");
    assert!(!debug.contains(support::s3::SECRET_KEY), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_without_bytes_round_trips() {
    let s3 = S3s::start().await;
    let store = store(&s3, "empty").await;
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "a/zero", b"");
    std::fs::create_dir_all(src.path().join("b/c")).unwrap();
    let out = store
        .checkpoint("job-e", src.path(), &opts("w"))
        .await
        .unwrap();
    let m = &out.manifest;
    assert_eq!(
        (m.total_size, m.chunks.len(), m.data.as_deref()),
        (0, 0, None)
    );
    store.verify(m).await.unwrap();
    let dst = tempfile::tempdir().unwrap();
    store
        .resume("job-e", dst.path(), &TransferOptions::default())
        .await
        .unwrap();
    assert_eq!(tree(dst.path()), tree(src.path()));
    // An empty directory is a checkpoint too.
    let none = tempfile::tempdir().unwrap();
    let out = store
        .checkpoint("job-e", none.path(), &opts("w"))
        .await
        .unwrap();
    assert_eq!((out.manifest.seq, out.manifest.files.len()), (2, 0));
}

/// The seqs of `job`'s complete generations, oldest first.
async fn complete_seqs(store: &S3Store, job: &str) -> Vec<u64> {
    store
        .list(Some(job))
        .await
        .unwrap()
        .into_iter()
        .filter(|g| g.complete)
        .map(|g| g.seq)
        .collect()
}
