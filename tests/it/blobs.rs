//! The blob store on a local directory and on S3 (SeaweedFS, started by
//! scripts/test.sh): content addressing, idempotent puts, verified reads
//! that report corruption, listing and deletion; the sweep of what killed
//! writers leave (partial writes, blobs no row refers to).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use weightgen::blobs::{BlobError, BlobStore, sha256_hex};
use weightgen::catalog::{Catalog, ModelSource, ZooModelRecord};
use weightgen::gc::{GcConfig, collect};
use weightgen::weights::ArchSpec;

/// A catalog row for a blob already stored.
fn row(id: &str, sha256: &str, size: u64) -> ZooModelRecord {
    ZooModelRecord {
        id: id.into(),
        zoo: "z".into(),
        architecture: "mlp".into(),
        family: "digits".into(),
        source: ModelSource::Ingested,
        task: serde_json::json!({}),
        seed: 1,
        metrics: BTreeMap::new(),
        training_config: serde_json::json!({}),
        sha256: sha256.into(),
        size_bytes: size,
        created_at_ms: 0,
    }
}

/// A row's blob, a training run's state blob (named pointer), an orphan
/// blob and (on a local store) a partial write: a sweep keeps everything
/// younger than the grace period, a dry run removes nothing, and a real
/// sweep removes exactly the orphan and the partial write.
async fn sweep_removes_only_orphans(catalog: &dyn Catalog, store: &BlobStore, staging: bool) {
    catalog
        .register_architecture(&ArchSpec::sequential_mlp("mlp", "digits", &[64, 16, 5]).unwrap())
        .await
        .unwrap();
    let kept = store.put(Bytes::from_static(b"a model")).await.unwrap();
    catalog
        .insert_zoo_model(&row("m", &kept.sha256, kept.size))
        .await
        .unwrap();
    let state = store
        .put(Bytes::from_static(b"a run's state"))
        .await
        .unwrap();
    let pointer = serde_json::json!({"sha256": state.sha256, "step": 3});
    store
        .put_named("training/run-1/state", Bytes::from(pointer.to_string()))
        .await
        .unwrap();
    let orphan = store.put(Bytes::from_static(b"no row")).await.unwrap();
    if staging {
        let dir = std::path::PathBuf::from(store.url())
            .join("sha256")
            .join(&orphan.sha256[..2]);
        std::fs::write(dir.join(format!("{}#7", sha256_hex(b"partial"))), b"half").unwrap();
    }
    let partials = usize::from(staging);

    let young = collect(catalog, store, &GcConfig::default()).await.unwrap();
    assert_eq!((young.young, young.live), (1 + partials, 2), "{young:?}");
    assert!(young.unreferenced.is_empty() && young.staging.is_empty());
    let now = GcConfig {
        grace: Duration::ZERO,
        dry_run: true,
        upload_staging: None,
    };
    let dry = collect(catalog, store, &now).await.unwrap();
    assert_eq!(dry.unreferenced, std::slice::from_ref(&orphan.sha256));
    assert_eq!(dry.staging.len(), partials);
    assert!(store.exists(&orphan.sha256).await.unwrap());
    let done = collect(
        catalog,
        store,
        &GcConfig {
            dry_run: false,
            ..now.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(done.unreferenced, std::slice::from_ref(&orphan.sha256));
    assert_eq!(done.bytes, orphan.size + if staging { 4 } else { 0 });
    assert!(!store.exists(&orphan.sha256).await.unwrap());
    assert!(store.staging_files().await.unwrap().is_empty());
    let mut live = vec![kept.sha256, state.sha256];
    live.sort();
    assert_eq!(store.list().await.unwrap(), live);
    let again = collect(catalog, store, &now).await.unwrap();
    assert!(
        again.unreferenced.is_empty() && again.staging.is_empty(),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_sweep_of_a_local_store_removes_only_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = weightgen::catalog::open(&format!(
        "sqlite://{}",
        dir.path().join("catalog.db").display()
    ))
    .await
    .unwrap();
    let store = BlobStore::local(&dir.path().join("blobs")).unwrap();
    sweep_removes_only_orphans(catalog.as_ref(), &store, true).await;
}

#[tokio::test]
async fn a_sweep_of_an_s3_store_removes_only_orphans() {
    let database = crate::common::services::TestDatabase::create("gc").await;
    let catalog = weightgen::catalog::open(&database.url).await.unwrap();
    let store = BlobStore::open(&crate::common::services::s3_prefix("gc")).unwrap();
    sweep_removes_only_orphans(catalog.as_ref(), &store, false).await;
}

async fn behaves_as_a_content_addressed_store(store: &BlobStore) {
    let payload = Bytes::from(vec![7u8; 300_000]);
    let stored = store.put(payload.clone()).await.unwrap();
    assert_eq!(stored.sha256, sha256_hex(&payload));
    assert_eq!(stored.size, 300_000);
    assert!(store.exists(&stored.sha256).await.unwrap());
    assert_eq!(store.get(&stored.sha256).await.unwrap(), payload);
    // Same bytes, same key; a second blob is listed beside it.
    assert_eq!(store.put(payload.clone()).await.unwrap(), stored);
    let small = store.put(Bytes::from_static(b"weights")).await.unwrap();
    let mut expected = vec![stored.sha256.clone(), small.sha256.clone()];
    expected.sort();
    assert_eq!(store.list().await.unwrap(), expected);
    // Missing and malformed keys are told apart.
    let absent = sha256_hex(b"never stored");
    assert!(matches!(
        store.get(&absent).await,
        Err(BlobError::NotFound(h)) if h == absent
    ));
    assert!(!store.exists(&absent).await.unwrap());
    assert!(matches!(
        store.get("not-a-hash").await,
        Err(BlobError::InvalidHash(_))
    ));
    store.delete(&small.sha256).await.unwrap();
    store.delete(&small.sha256).await.unwrap();
    assert_eq!(
        store.list().await.unwrap(),
        std::slice::from_ref(&stored.sha256)
    );
}

#[tokio::test]
async fn a_local_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("blobs").to_str().unwrap()).unwrap();
    behaves_as_a_content_addressed_store(&store).await;
}

#[tokio::test]
async fn an_s3_store_on_seaweedfs() {
    let url = crate::common::services::s3_prefix("blobs");
    let store = BlobStore::open(&url).unwrap();
    behaves_as_a_content_addressed_store(&store).await;
    // Another prefix in the same bucket sees none of it.
    let neighbour = BlobStore::open(&crate::common::services::s3_prefix("other")).unwrap();
    assert!(neighbour.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn corruption_on_disk_is_reported_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::local(dir.path()).unwrap();
    let stored = store.put(Bytes::from_static(b"original")).await.unwrap();
    let path = dir
        .path()
        .join("sha256")
        .join(&stored.sha256[..2])
        .join(&stored.sha256);
    std::fs::write(&path, b"tampered").unwrap();
    match store.get(&stored.sha256).await {
        Err(BlobError::Corrupt { expected, actual }) => {
            assert_eq!(expected, stored.sha256);
            assert_eq!(actual, sha256_hex(b"tampered"));
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    // Putting the right bytes again repairs it.
    store.put(Bytes::from_static(b"original")).await.unwrap();
    assert_eq!(
        store.get(&stored.sha256).await.unwrap(),
        Bytes::from_static(b"original")
    );
}
