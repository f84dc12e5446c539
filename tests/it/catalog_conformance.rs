//! One conformance suite for the catalog, run against both backends: SQLite
//! (a file in a temporary directory) and PostgreSQL (a database of its own
//! inside `DATABASE_URL`, which scripts/test.sh provides).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::json;
use weightgen::catalog::{
    self, Catalog, CatalogError, DenoiserRecord, JobFilter, JobKind, JobOutcome, JobState,
    ModelSource, NewJob, PageRequest, Snapshot, ZooModelFilter, ZooModelRecord, ZooPlan,
};
use weightgen::weights::ArchSpec;

use crate::common::services::TestDatabase;

/// A catalog of one backend and what keeps it alive.
struct Backend {
    catalog: Arc<dyn Catalog>,
    _dir: Option<tempfile::TempDir>,
    _db: Option<TestDatabase>,
}

async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    Backend {
        catalog: catalog::open(&url).await.unwrap(),
        _dir: Some(dir),
        _db: None,
    }
}

async fn postgres(tag: &str) -> Backend {
    let db = TestDatabase::create(tag).await;
    Backend {
        catalog: catalog::open(&db.url).await.unwrap(),
        _dir: None,
        _db: Some(db),
    }
}

/// A second connection pool on the same catalog (another worker).
async fn second_handle(backend: &Backend) -> Arc<dyn Catalog> {
    match (&backend._dir, &backend._db) {
        (Some(dir), _) => catalog::open(&format!(
            "sqlite://{}",
            dir.path().join("catalog.db").display()
        ))
        .await
        .unwrap(),
        (_, Some(db)) => catalog::open(&db.url).await.unwrap(),
        _ => unreachable!(),
    }
}

fn arch(name: &str) -> ArchSpec {
    ArchSpec::sequential_mlp(name, "digits", &[64, 32, 5]).unwrap()
}

fn sha(n: u64) -> String {
    weightgen::blobs::sha256_hex(&n.to_le_bytes())
}

fn model(id: &str, zoo: &str, n: u64) -> ZooModelRecord {
    ZooModelRecord {
        id: id.into(),
        zoo: zoo.into(),
        architecture: "mlp".into(),
        family: "digits".into(),
        source: ModelSource::Built,
        task: json!({"class_ids": [0, 1, 2, 3, n % 10]}),
        seed: u64::MAX - n,
        metrics: BTreeMap::from([("test_accuracy".to_owned(), 0.9 + n as f64 * 1e-4)]),
        training_config: json!({"epochs": 30, "lr": 0.01}),
        sha256: sha(n),
        size_bytes: 1000 + n,
        created_at_ms: 0,
    }
}

async fn architectures_register_once_and_refuse_a_different_spec(c: Arc<dyn Catalog>) {
    assert!(c.register_architecture(&arch("mlp")).await.unwrap());
    assert!(!c.register_architecture(&arch("mlp")).await.unwrap());
    let other = ArchSpec::sequential_mlp("mlp", "digits", &[64, 16, 5]).unwrap();
    assert!(matches!(
        c.register_architecture(&other).await,
        Err(CatalogError::Conflict(_))
    ));
    let sinus = ArchSpec::sequential_mlp("sin", "sinusoid", &[1, 40, 40, 1]).unwrap();
    c.register_architecture(&sinus).await.unwrap();
    assert_eq!(c.architecture("mlp").await.unwrap(), Some(arch("mlp")));
    assert_eq!(c.architecture("nope").await.unwrap(), None);
    let all: Vec<String> = c
        .architectures(None)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(all, ["mlp", "sin"]);
    assert_eq!(c.architectures(Some("sinusoid")).await.unwrap(), [sinus]);
}

async fn zoo_models_round_trip_dedup_and_page(c: Arc<dyn Catalog>) {
    c.register_architecture(&arch("mlp")).await.unwrap();
    let first = c.insert_zoo_model(&model("m0", "z", 0)).await.unwrap();
    assert!(!first.deduplicated);
    let mut expected = model("m0", "z", 0);
    expected.created_at_ms = first.model.created_at_ms;
    assert_eq!(
        first.model, expected,
        "every field round-trips (u64 seed too)"
    );
    assert_eq!(c.zoo_model("m0").await.unwrap(), Some(expected.clone()));
    // The same file again (another id) is deduplicated to the stored row.
    let again = c.insert_zoo_model(&model("m0-copy", "z", 0)).await.unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.model.id, "m0");
    assert_eq!(c.zoo_model("m0-copy").await.unwrap(), None);
    // A taken id with a different file is a conflict.
    assert!(matches!(
        c.insert_zoo_model(&model("m0", "z", 99)).await,
        Err(CatalogError::Conflict(_))
    ));
    for n in 1..25 {
        let zoo = if n % 2 == 0 { "z" } else { "other" };
        c.insert_zoo_model(&model(&format!("m{n}"), zoo, n))
            .await
            .unwrap();
    }
    // Pages of 7 cover the 13 models of zoo "z" exactly once, newest first.
    let filter = ZooModelFilter {
        zoo: Some("z".into()),
        ..Default::default()
    };
    let mut page = PageRequest::first(7);
    let mut seen = Vec::new();
    loop {
        let got = c.zoo_models(&filter, &page).await.unwrap();
        assert_eq!(got.total, 13);
        assert!(got.items.len() <= 7);
        seen.extend(got.items.iter().map(|m| (m.created_at_ms, m.id.clone())));
        if got.next_token.is_empty() {
            break;
        }
        page.token = got.next_token;
    }
    assert_eq!(seen.len(), 13);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, ties by id");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 13);
    let by_family = ZooModelFilter {
        family: Some("digits".into()),
        architecture: Some("mlp".into()),
        ..Default::default()
    };
    assert_eq!(
        c.zoo_models(&by_family, &PageRequest::first(0))
            .await
            .unwrap()
            .total,
        25
    );
    // Bad input names its field.
    let bad_token = PageRequest {
        size: 5,
        token: "garbage".into(),
    };
    let err = c.zoo_models(&filter, &bad_token).await.unwrap_err();
    assert!(err.to_string().starts_with("page_token:"), "{err}");
    let mut bad = model("bad", "z", 500);
    bad.sha256 = "XYZ".into();
    let err = c.insert_zoo_model(&bad).await.unwrap_err();
    assert!(err.to_string().starts_with("sha256:"), "{err}");
    let mut unknown_arch = model("u", "z", 501);
    unknown_arch.architecture = "unregistered".into();
    let err = c.insert_zoo_model(&unknown_arch).await.unwrap_err();
    assert!(err.to_string().starts_with("architecture:"), "{err}");
    let mut nan = model("nan", "z", 502);
    nan.metrics.insert("loss".into(), f64::NAN);
    assert!(c.insert_zoo_model(&nan).await.is_err());
    // Snapshots.
    for epoch in [30, 10, 20] {
        c.add_snapshot(&Snapshot {
            model_id: "m0".into(),
            epoch,
            sha256: sha(1000 + epoch),
            size_bytes: 9,
        })
        .await
        .unwrap();
    }
    let epochs: Vec<u64> = c
        .snapshots("m0")
        .await
        .unwrap()
        .iter()
        .map(|s| s.epoch)
        .collect();
    assert_eq!(epochs, [10, 20, 30]);
    let missing = Snapshot {
        model_id: "nope".into(),
        epoch: 1,
        sha256: sha(1),
        size_bytes: 1,
    };
    assert!(matches!(
        c.add_snapshot(&missing).await,
        Err(CatalogError::NotFound { .. })
    ));
    let referenced = c.referenced_blobs().await.unwrap();
    assert_eq!(referenced.len(), 25 + 3);
    assert!(referenced.contains(&sha(1010)));
}

fn plan(name: &str, n: u64) -> (ZooPlan, Vec<serde_json::Value>) {
    (
        ZooPlan {
            name: name.into(),
            family: "digits".into(),
            architecture: "mlp".into(),
            config: json!({"shared_init": true, "epochs": 30}),
            num_models: n,
        },
        (0..n)
            .map(|i| json!({"seed": i, "classes": [i % 10]}))
            .collect(),
    )
}

async fn zoo_plans_are_idempotent_and_units_resume(c: Arc<dyn Catalog>) {
    c.register_architecture(&arch("mlp")).await.unwrap();
    let (p, specs) = plan("z", 5);
    c.plan_zoo(&p, &specs).await.unwrap();
    c.plan_zoo(&p, &specs).await.unwrap();
    assert_eq!(c.zoo("z").await.unwrap(), Some(p.clone()));
    let mut different = p.clone();
    different.config = json!({"shared_init": false});
    let err = c.plan_zoo(&different, &specs).await.unwrap_err();
    assert!(
        matches!(err, CatalogError::Conflict(_)) && err.to_string().contains("config"),
        "{err}"
    );
    assert!(c.plan_zoo(&p, &specs[..3]).await.is_err());
    let progress = c.zoo_progress("z").await.unwrap();
    assert_eq!((progress.total, progress.pending), (5, 5));

    let far_past = 0;
    let a = c
        .claim_unit("z", "worker-a", far_past)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.unit, a.attempts), (0, 1));
    assert_eq!(a.spec, specs[0]);
    let b = c
        .claim_unit("z", "worker-b", far_past)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.unit, 1);
    // Only the holder can complete a unit.
    let err = c
        .complete_unit("z", 0, "worker-b", &model("z/0", "z", 0), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, CatalogError::Conflict(_)), "{err}");
    assert_eq!(
        c.zoo_model("z/0").await.unwrap(),
        None,
        "a refused completion adds no row"
    );
    let snapshot = Snapshot {
        model_id: "z/0".into(),
        epoch: 5,
        sha256: sha(77),
        size_bytes: 10,
    };
    c.complete_unit(
        "z",
        0,
        "worker-a",
        &model("z/0", "z", 0),
        std::slice::from_ref(&snapshot),
    )
    .await
    .unwrap();
    assert_eq!(c.snapshots("z/0").await.unwrap(), [snapshot]);
    // worker-b fails and gives its unit back; the next claim gets it again.
    c.release_unit("z", 1, "worker-b").await.unwrap();
    let again = c
        .claim_unit("z", "worker-b", far_past)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.unit, again.attempts), (1, 2));
    // worker-b crashes holding unit 1: a claim made after it counts it as stale.
    let c2 = c
        .claim_unit("z", "worker-c", far_past)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c2.unit, 2);
    let stale_after_now = catalog::now_ms() + 1;
    let d = c
        .claim_unit("z", "worker-d", stale_after_now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        d.unit, 1,
        "the oldest open unit, the stale one, comes first"
    );
    let err = c
        .complete_unit("z", 1, "worker-b", &model("z/1", "z", 1), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, CatalogError::Conflict(_)),
        "the dead worker lost its claim: {err}"
    );
    // Both open claims (worker-c's and worker-d's) are older than a moment
    // taken after the last of them; `stale_after_now` was taken before
    // worker-d's claim, which may carry a later timestamp.
    let after_both = catalog::now_ms() + 1;
    assert_eq!(c.release_claims_before("z", after_both).await.unwrap(), 2);
    let progress = c.zoo_progress("z").await.unwrap();
    assert_eq!(
        (progress.done, progress.claimed, progress.pending),
        (1, 0, 4)
    );
    // Finish the zoo; then nothing is left to claim.
    while let Some(unit) = c.claim_unit("z", "worker-e", far_past).await.unwrap() {
        let id = format!("z/{}", unit.unit);
        c.complete_unit("z", unit.unit, "worker-e", &model(&id, "z", unit.unit), &[])
            .await
            .unwrap();
    }
    let progress = c.zoo_progress("z").await.unwrap();
    assert_eq!((progress.done, progress.total), (5, 5));
    let zoo = ZooModelFilter {
        zoo: Some("z".into()),
        ..Default::default()
    };
    assert_eq!(
        c.zoo_models(&zoo, &PageRequest::first(0))
            .await
            .unwrap()
            .total,
        5
    );
}

async fn two_workers_never_build_the_same_unit(c: Arc<dyn Catalog>, other: Arc<dyn Catalog>) {
    c.register_architecture(&arch("mlp")).await.unwrap();
    let (p, specs) = plan("shared", 60);
    c.plan_zoo(&p, &specs).await.unwrap();
    let work = |catalog: Arc<dyn Catalog>, worker: &'static str| async move {
        let mut built = Vec::new();
        while let Some(unit) = catalog.claim_unit("shared", worker, 0).await.unwrap() {
            let id = format!("shared/{}", unit.unit);
            catalog
                .complete_unit(
                    "shared",
                    unit.unit,
                    worker,
                    &model(&id, "shared", unit.unit),
                    &[],
                )
                .await
                .unwrap();
            built.push(unit.unit);
        }
        built
    };
    let (a, b) = tokio::join!(
        tokio::spawn(work(c.clone(), "w1")),
        tokio::spawn(work(other, "w2"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let all: BTreeSet<u64> = a.iter().chain(&b).copied().collect();
    assert_eq!(a.len() + b.len(), 60, "no unit built twice");
    assert_eq!(all.len(), 60, "every unit built");
    eprintln!(
        "{}: worker 1 built {}, worker 2 built {}",
        c.backend(),
        a.len(),
        b.len()
    );
}

fn denoiser(id: &str, arch: &str) -> DenoiserRecord {
    DenoiserRecord {
        id: id.into(),
        architecture: arch.into(),
        sha256: weightgen::blobs::sha256_hex(id.as_bytes()),
        size_bytes: 123,
        config: json!({"dim": 2245}),
        summary: BTreeMap::from([("val_loss".to_owned(), 0.1)]),
        active: false,
        created_at_ms: 0,
    }
}

async fn one_denoiser_is_active_per_architecture(c: Arc<dyn Catalog>, other: Arc<dyn Catalog>) {
    c.register_architecture(&arch("mlp")).await.unwrap();
    c.register_architecture(&arch("mlp2")).await.unwrap();
    for id in ["d1", "d2", "d3"] {
        c.insert_denoiser(&denoiser(id, "mlp")).await.unwrap();
    }
    c.insert_denoiser(&denoiser("e1", "mlp2")).await.unwrap();
    assert!(matches!(
        c.insert_denoiser(&denoiser("d1", "mlp")).await,
        Err(CatalogError::Conflict(_))
    ));
    assert_eq!(c.active_denoiser("mlp").await.unwrap(), None);
    assert!(c.activate_denoiser("d1").await.unwrap().active);
    c.activate_denoiser("e1").await.unwrap();
    // Racing activations leave exactly one active, and never touch mlp2's.
    let (x, y) = tokio::join!(c.activate_denoiser("d2"), other.activate_denoiser("d3"));
    x.unwrap();
    y.unwrap();
    let page = c
        .denoisers(Some("mlp"), &PageRequest::first(2))
        .await
        .unwrap();
    assert_eq!((page.items.len(), page.total), (2, 3));
    let rest = c
        .denoisers(
            Some("mlp"),
            &PageRequest {
                size: 2,
                token: page.next_token.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert!(rest.next_token.is_empty());
    let active: Vec<_> = page
        .items
        .iter()
        .chain(&rest.items)
        .filter(|d| d.active)
        .collect();
    assert_eq!(active.len(), 1);
    assert_eq!(
        c.active_denoiser("mlp").await.unwrap().unwrap().id,
        active[0].id
    );
    assert_eq!(c.active_denoiser("mlp2").await.unwrap().unwrap().id, "e1");
    assert!(matches!(
        c.activate_denoiser("missing").await,
        Err(CatalogError::NotFound { .. })
    ));
    let stored = c.denoiser("e1").await.unwrap().unwrap();
    assert_eq!(stored.config, json!({"dim": 2245}));
    assert_eq!(stored.summary["val_loss"], 0.1);
}

macro_rules! conformance {
    ($($name:ident => |$c:ident, $other:ident| $body:expr;)*) => {
        mod on_sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = sqlite().await;
                    assert_eq!(backend.catalog.backend(), "sqlite");
                    let $c = backend.catalog.clone();
                    let $other = second_handle(&backend).await;
                    let _ = &$other;
                    $body.await;
                }
            )*
        }
        mod on_postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = postgres(stringify!($name)).await;
                    assert_eq!(backend.catalog.backend(), "postgres");
                    let $c = backend.catalog.clone();
                    let $other = second_handle(&backend).await;
                    let _ = &$other;
                    $body.await;
                }
            )*
        }
    };
}

conformance! {
    architectures => |c, other| architectures_register_once_and_refuse_a_different_spec(c);
    zoo_models => |c, other| zoo_models_round_trip_dedup_and_page(c);
    zoo_units => |c, other| zoo_plans_are_idempotent_and_units_resume(c);
    concurrent_workers => |c, other| two_workers_never_build_the_same_unit(c, other);
    denoisers => |c, other| one_denoiser_is_active_per_architecture(c, other);
    jobs => |c, other| jobs_are_claimed_heartbeated_retried_and_cancelled(c);
    job_traces => |c, other| a_job_keeps_its_submitters_trace_context(c);
    concurrent_job_claims => |c, other| two_workers_never_claim_the_same_job(c, other);
}

fn new_job(id: &str, max_attempts: u32, key: Option<&str>) -> NewJob {
    NewJob {
        id: id.to_owned(),
        kind: JobKind::TrainDenoiser,
        spec: json!({"zoo": "digits", "steps": 10}),
        max_attempts,
        idempotency_key: key.map(str::to_owned),
        traceparent: None,
    }
}

/// A lease cut-off that every running job is older than, except `live`,
/// whose worker heartbeats just after it.
async fn lease_cut(c: &Arc<dyn Catalog>, live: &str, worker: &str) -> i64 {
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let cut = catalog::now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    c.heartbeat_job(live, worker, 0.0, "alive").await.unwrap();
    cut
}

async fn a_job_keeps_its_submitters_trace_context(c: Arc<dyn Catalog>) {
    let mut traced = new_job("job-t", 1, None);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    traced.traceparent = Some(traceparent.into());
    let stored = c.submit_job(&traced).await.unwrap();
    assert_eq!(stored.traceparent.as_deref(), Some(traceparent));
    let claimed = c.claim_job("w1", 0).await.unwrap().unwrap();
    assert_eq!(claimed.traceparent.as_deref(), Some(traceparent));
    traced.id = "job-t2".into();
    traced.traceparent = Some("00-4bf92f35 77b3".into());
    assert!(matches!(
        c.submit_job(&traced).await.unwrap_err(),
        CatalogError::InvalidArgument {
            field: "traceparent",
            ..
        }
    ));
}

async fn jobs_are_claimed_heartbeated_retried_and_cancelled(c: Arc<dyn Catalog>) {
    // Submission: idempotent by key, refused by field when bad.
    let a = c
        .submit_job(&new_job("job-a", 2, Some("key-a")))
        .await
        .unwrap();
    assert_eq!(
        (a.state, a.attempts, a.max_attempts),
        (JobState::Queued, 0, 2)
    );
    assert_eq!(a.traceparent, None);
    // A resubmission from another trace finds the job (the trace context
    // is not part of its spec) and keeps the first submitter's trace.
    let mut traced = new_job("job-a2", 2, Some("key-a"));
    traced.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let again = c.submit_job(&traced).await.unwrap();
    assert_eq!((again.id.as_str(), again.traceparent), ("job-a", None));

    let mut other_spec = new_job("job-a3", 2, Some("key-a"));
    other_spec.spec = json!({"zoo": "sinusoid"});
    assert!(matches!(
        c.submit_job(&other_spec).await.unwrap_err(),
        CatalogError::InvalidArgument {
            field: "idempotency_key",
            ..
        }
    ));
    assert!(matches!(
        c.submit_job(&new_job("job-a", 1, None)).await.unwrap_err(),
        CatalogError::Conflict(_)
    ));
    assert!(matches!(
        c.submit_job(&new_job("job-z", 0, None)).await.unwrap_err(),
        CatalogError::InvalidArgument {
            field: "max_attempts",
            ..
        }
    ));
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let b = c.submit_job(&new_job("job-b", 1, None)).await.unwrap();

    // Oldest first; a held job is not handed out twice.
    let far_past = catalog::now_ms() - 3_600_000;
    let claimed = c.claim_job("w1", far_past).await.unwrap().unwrap();
    assert_eq!(
        (claimed.id.as_str(), claimed.state, claimed.attempts),
        ("job-a", JobState::Running, 1)
    );
    assert_eq!(claimed.worker.as_deref(), Some("w1"));
    let second = c.claim_job("w2", far_past).await.unwrap().unwrap();
    assert_eq!(second.id, b.id);
    assert!(c.claim_job("w3", far_past).await.unwrap().is_none());

    // Heartbeats renew and report; only the holder may send them.
    let beat = c
        .heartbeat_job("job-a", "w1", 0.25, "step 5/10")
        .await
        .unwrap();
    assert_eq!((beat.progress, beat.message.as_str()), (0.25, "step 5/10"));
    assert!(matches!(
        c.heartbeat_job("job-a", "w2", 0.5, "").await.unwrap_err(),
        CatalogError::Conflict(_)
    ));

    // A failed attempt with attempts left is queued again, with its reason.
    let failed = c
        .finish_job(
            "job-a",
            "w1",
            &JobOutcome::Failed {
                error: "out of memory".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (failed.state, failed.error.as_str()),
        (JobState::Queued, "out of memory")
    );
    assert!(failed.finished_at_ms.is_none());

    // Its next worker dies: once the lease expires (heartbeat older than
    // stale_before) the job is out of attempts and fails for good.
    let retry = c.claim_job("w3", far_past).await.unwrap().unwrap();
    assert_eq!((retry.id.as_str(), retry.attempts), ("job-a", 2));
    assert!(
        c.claim_job("w4", far_past).await.unwrap().is_none(),
        "lease still live"
    );
    let cut = lease_cut(&c, &b.id, "w2").await;
    assert!(c.claim_job("w4", cut).await.unwrap().is_none());
    let dead = c.job("job-a").await.unwrap().unwrap();
    assert_eq!(dead.state, JobState::Failed);
    assert!(dead.error.starts_with("lease expired"), "{}", dead.error);
    assert!(dead.error.contains("out of memory"), "{}", dead.error);
    assert!(matches!(
        c.finish_job(
            "job-a",
            "w3",
            &JobOutcome::Succeeded {
                denoiser_id: None,
                models_built: 0
            }
        )
        .await
        .unwrap_err(),
        CatalogError::Conflict(_)
    ));

    // A dead worker's job with attempts left goes to the next worker.
    let c1 = c.submit_job(&new_job("job-c", 3, None)).await.unwrap();
    let held = c.claim_job("w5", far_past).await.unwrap().unwrap();
    assert_eq!(held.id, c1.id);
    let cut = lease_cut(&c, &b.id, "w2").await;
    let taken = c.claim_job("w6", cut).await.unwrap().unwrap();
    assert_eq!(
        (taken.id.as_str(), taken.attempts, taken.worker.as_deref()),
        ("job-c", 2, Some("w6"))
    );
    assert!(matches!(
        c.heartbeat_job("job-c", "w5", 0.1, "").await.unwrap_err(),
        CatalogError::Conflict(_)
    ));
    let done = c
        .finish_job(
            "job-c",
            "w6",
            &JobOutcome::Succeeded {
                denoiser_id: Some("d1".into()),
                models_built: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (done.state, done.progress, done.denoiser_id.as_deref()),
        (JobState::Succeeded, 1.0, Some("d1"))
    );
    assert!(done.finished_at_ms.is_some());

    // Cancelling: a running job's worker learns it on its next heartbeat; a
    // finished job is returned unchanged; an unknown one is not found.
    let cancelled = c.cancel_job(&b.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    let err = c.heartbeat_job(&b.id, "w2", 0.5, "").await.unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_eq!(
        c.cancel_job("job-c").await.unwrap().state,
        JobState::Succeeded
    );
    assert!(matches!(
        c.cancel_job("nope").await.unwrap_err(),
        CatalogError::NotFound { .. }
    ));

    // Listing: newest first, filtered, paged.
    let all = c
        .jobs(&JobFilter::default(), &PageRequest::first(2))
        .await
        .unwrap();
    assert_eq!(all.total, 3);
    assert_eq!(
        all.items.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["job-c", "job-b"]
    );
    let rest = c
        .jobs(
            &JobFilter::default(),
            &PageRequest {
                size: 2,
                token: all.next_token.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        rest.items.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["job-a"]
    );
    assert!(rest.next_token.is_empty());
    let failed_only = c
        .jobs(
            &JobFilter {
                kind: Some(JobKind::TrainDenoiser),
                state: Some(JobState::Failed),
            },
            &PageRequest::first(10),
        )
        .await
        .unwrap();
    assert_eq!(failed_only.items.len(), 1);
}

async fn two_workers_never_claim_the_same_job(c: Arc<dyn Catalog>, other: Arc<dyn Catalog>) {
    for i in 0..20 {
        c.submit_job(&new_job(&format!("job-{i:02}"), 1, None))
            .await
            .unwrap();
    }
    let far_past = catalog::now_ms() - 3_600_000;
    let drain = |cat: Arc<dyn Catalog>, worker: &'static str| async move {
        let mut got = Vec::new();
        while let Some(job) = cat.claim_job(worker, far_past).await.unwrap() {
            got.push(job.id);
        }
        got
    };
    let (a, b) = tokio::join!(
        tokio::spawn(drain(c.clone(), "wa")),
        tokio::spawn(drain(other.clone(), "wb"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let all: BTreeSet<String> = a.iter().chain(&b).cloned().collect();
    assert_eq!(
        a.len() + b.len(),
        20,
        "a job was claimed twice: {a:?} {b:?}"
    );
    assert_eq!(all.len(), 20);
}

#[tokio::test]
async fn unsupported_catalog_urls_name_the_field() {
    let err = catalog::open("mysql://x").await.unwrap_err().to_string();
    assert!(
        err.starts_with("catalog:") && err.contains("mysql://x"),
        "{err}"
    );
}
