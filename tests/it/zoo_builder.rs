//! The zoo builder end to end, through the `weightgen-worker` binary:
//! killed with SIGKILL mid-way and restarted it completes the zoo with no
//! duplicate, orphan row or orphan blob; two workers share a PostgreSQL zoo
//! without overlap; the models reach sensible metrics; and S3 + PostgreSQL
//! replace the embedded defaults with nothing else changed.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weightgen::blobs::BlobStore;
use weightgen::catalog::{self, Catalog, PageRequest, ZooModelFilter, ZooModelRecord};
use weightgen::storage::StorageArgs;
use weightgen::weights::decode_safetensors;

use crate::common::services::{TestDatabase, s3_prefix};

fn worker(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weightgen-worker"));
    command
        .args(["zoo", "build"])
        .args(args)
        .env("RUST_LOG", "info");
    command
}

fn run_worker(args: &[&str]) -> (String, String) {
    let output = worker(args).output().expect("run weightgen-worker");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        output.status.success(),
        "worker failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// "built N models …" → N.
fn built(stdout: &str) -> u64 {
    stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected summary {stdout:?}"))
}

async fn all_models(catalog: &Arc<dyn Catalog>, zoo: &str) -> Vec<ZooModelRecord> {
    let filter = ZooModelFilter {
        zoo: Some(zoo.into()),
        ..Default::default()
    };
    let mut page = PageRequest::first(1000);
    let mut out = Vec::new();
    loop {
        let got = catalog.zoo_models(&filter, &page).await.unwrap();
        out.extend(got.items);
        if got.next_token.is_empty() {
            return out;
        }
        page.token = got.next_token;
    }
}

/// Every row's blob exists and verifies, and every blob belongs to a row.
async fn assert_rows_and_blobs_match(catalog: &Arc<dyn Catalog>, blobs: &BlobStore) {
    let referenced: BTreeSet<String> = catalog
        .referenced_blobs()
        .await
        .unwrap()
        .into_iter()
        .collect();
    let stored: BTreeSet<String> = blobs.list().await.unwrap().into_iter().collect();
    assert_eq!(
        stored, referenced,
        "orphan blobs or rows without their file"
    );
    for sha in &stored {
        blobs.get(sha).await.expect("blob verifies");
    }
}

async fn open_sqlite(data_dir: &Path) -> (Arc<dyn Catalog>, BlobStore) {
    StorageArgs::embedded(data_dir).open().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_killed_mid_way_resumes_without_duplicates_or_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let args = [
        "--family",
        "sinusoid",
        "--models",
        "40",
        "--steps",
        "300",
        "--jobs",
        "2",
        "--keep-snapshots",
        "2",
        "--data-dir",
        data_dir,
    ];
    // The catalog exists (migrated) before the worker starts; the test
    // watches it through its own connection.
    let (catalog, _) = open_sqlite(dir.path()).await;
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let mut child = worker(&args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // Wait until part of the zoo is built, then SIGKILL the worker.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut done_at_kill = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(progress) = catalog.zoo_progress("sinusoid").await
            && progress.done >= 10
        {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            done_at_kill = catalog.zoo_progress("sinusoid").await.unwrap().done;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the worker exited ({status}) before it was killed:\n{}",
                std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default()
            );
        }
    }
    // (Already dead unless the deadline passed.)
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        (10..40).contains(&done_at_kill),
        "killed mid-way: {done_at_kill} of 40 done"
    );
    // Restart: it finishes the zoo, building only what was missing.
    let (stdout, _) = run_worker(&args);
    let rebuilt = built(&stdout);
    assert_eq!(rebuilt, 40 - done_at_kill, "{stdout}");
    let (catalog, blobs) = open_sqlite(dir.path()).await;
    let progress = catalog.zoo_progress("sinusoid").await.unwrap();
    assert_eq!(
        (progress.done, progress.claimed, progress.pending),
        (40, 0, 0)
    );
    let models = all_models(&catalog, "sinusoid").await;
    let ids: BTreeSet<&str> = models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!((models.len(), ids.len()), (40, 40));
    for model in &models {
        assert_eq!(
            catalog.snapshots(&model.id).await.unwrap().len(),
            1,
            "{}",
            model.id
        );
    }
    assert_rows_and_blobs_match(&catalog, &blobs).await;
    // A third run finds nothing to do.
    let (stdout, _) = run_worker(&args);
    assert_eq!(built(&stdout), 0, "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_build_one_postgres_zoo_without_overlap() {
    let db = TestDatabase::create("two_workers").await;
    let blob_dir = tempfile::tempdir().unwrap();
    let common_args = |id: &'static str| {
        [
            "--family",
            "digits",
            "--models",
            "40",
            "--jobs",
            "1",
            "--worker-id",
            id,
            "--catalog",
            &db.url,
            "--blobs",
            blob_dir.path().to_str().unwrap(),
        ]
        .map(str::to_owned)
    };
    let spawn = |id: &'static str| {
        worker(
            &common_args(id)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn("w1"), spawn("w2"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let text = |o: &std::process::Output| {
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let ((out_a, err_a), (out_b, err_b)) = (text(&a), text(&b));
    assert!(
        a.status.success() && b.status.success(),
        "{out_a}{err_a}{out_b}{err_b}"
    );
    let (built_a, built_b) = (built(&out_a), built(&out_b));
    eprintln!("worker 1 built {built_a}, worker 2 built {built_b}");
    assert_eq!(built_a + built_b, 40, "every model built exactly once");
    // Each unit was claimed once: no retries, no result dropped.
    for log in [&err_a, &err_b] {
        assert!(!log.contains("taken over"), "{log}");
        assert!(
            log.lines()
                .filter(|l| l.contains("model built"))
                .all(|l| l.contains("attempts=1"))
        );
    }
    let catalog = catalog::open(&db.url).await.unwrap();
    let models = all_models(&catalog, "digits").await;
    assert_eq!(models.len(), 40);
    let blobs = BlobStore::open(blob_dir.path().to_str().unwrap()).unwrap();
    assert_rows_and_blobs_match(&catalog, &blobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zoo_models_learn_their_tasks_and_record_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    run_worker(&[
        "--family",
        "digits",
        "--models",
        "12",
        "--data-dir",
        data_dir,
    ]);
    run_worker(&[
        "--family",
        "sinusoid",
        "--models",
        "12",
        "--data-dir",
        data_dir,
    ]);
    let (catalog, blobs) = open_sqlite(dir.path()).await;
    let mean = |models: &[ZooModelRecord], key: &str| {
        models.iter().map(|m| m.metrics[key]).sum::<f64>() / models.len() as f64
    };
    let digits = all_models(&catalog, "digits").await;
    let accuracy = mean(&digits, "test_accuracy");
    assert!(accuracy > 0.9, "digits zoo mean test accuracy {accuracy}");
    let sine = all_models(&catalog, "sinusoid").await;
    let mse = mean(&sine, "test_mse");
    assert!(mse < 0.1, "sinusoid zoo mean test MSE {mse}");
    eprintln!("digits mean test accuracy {accuracy:.4}, sinusoid mean test MSE {mse:.4}");
    // Each row carries its task and the shared featurizer's descriptor.
    let task = &digits[0].task;
    assert_eq!(task["spec"]["family"], "digits");
    assert_eq!(
        task["descriptor"]["features"]["class_one_hot"]
            .as_array()
            .unwrap()
            .len(),
        50
    );
    // Independent initializations by default: the seeds differ.
    let seeds: BTreeSet<u64> = digits.iter().map(|m| m.seed).collect();
    assert_eq!(seeds.len(), 12);
    // The stored file says what it is, to a Hugging Face loader too.
    let file = decode_safetensors(&blobs.get(&digits[0].sha256).await.unwrap()).unwrap();
    assert_eq!(file.metadata["format"], "pt");
    assert_eq!(file.metadata["zoo"], "digits");
    assert_eq!(file.metadata["architecture"], digits[0].architecture);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_s3_replace_the_embedded_defaults() {
    let db = TestDatabase::create("zoo_s3").await;
    let blobs_url = s3_prefix("zoo");
    let (stdout, _) = run_worker(&[
        "--family",
        "digit-inr",
        "--models",
        "6",
        "--shared-init",
        "--catalog",
        &db.url,
        "--blobs",
        &blobs_url,
    ]);
    assert_eq!(built(&stdout), 6);
    let catalog = catalog::open(&db.url).await.unwrap();
    let blobs = BlobStore::open(&blobs_url).unwrap();
    assert_eq!(all_models(&catalog, "digit-inr").await.len(), 6);
    assert_rows_and_blobs_match(&catalog, &blobs).await;
}
