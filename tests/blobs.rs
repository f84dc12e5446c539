//! The blob store on a local directory and on S3 (SeaweedFS, started by
//! scripts/test.sh): content addressing, idempotent puts, verified reads
//! that report corruption, listing and deletion.

mod common;

use bytes::Bytes;
use weightgen::blobs::{BlobError, BlobStore, sha256_hex};

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
    let url = common::services::s3_prefix("blobs");
    let store = BlobStore::open(&url).unwrap();
    behaves_as_a_content_addressed_store(&store).await;
    // Another prefix in the same bucket sees none of it.
    let neighbour = BlobStore::open(&common::services::s3_prefix("other")).unwrap();
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
