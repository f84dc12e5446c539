//! Content-addressed blob storage for checkpoints over `object_store`: a
//! local directory by default, `s3://bucket/prefix` in production (the usual
//! `AWS_*` environment: credentials, `AWS_REGION`, `AWS_ENDPOINT`,
//! `AWS_ALLOW_HTTP`). A blob's key is its SHA-256; a put returns only once
//! the bytes are durable (fsync'd on a local disk, acknowledged by S3), so a
//! catalog row written afterwards never points at a missing file; a get
//! re-hashes the bytes and reports corruption instead of returning them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};

use crate::breaker::{BackendGuard, Outcome, Unavailable};

pub mod upload;

/// The cause, when `error` says the store could not be reached or did not
/// answer (object_store reports both, after its retries, as `Generic`).
fn unreachable_cause(error: &BlobError) -> Option<String> {
    match error {
        BlobError::Unavailable(u) => Some(u.cause.clone()),
        BlobError::Store(e @ object_store::Error::Generic { .. }) => Some(e.to_string()),
        _ => None,
    }
}

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob with that hash.
    #[error("blob {0} not found")]
    NotFound(String),
    /// The stored bytes do not hash to their key.
    #[error("blob {expected} is corrupt: its bytes hash to {actual}")]
    Corrupt {
        /// The key.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A hash argument is not 64 lowercase hex digits.
    #[error("sha256: {0:?} is not 64 lowercase hex digits")]
    InvalidHash(String),
    /// The store URL cannot be used.
    #[error("blobs: {0}")]
    InvalidUrl(String),
    /// A named object's name is unusable.
    #[error("object name {0:?}: use segments of letters, digits, '.', '_' and '-' joined by '/'")]
    InvalidName(String),
    /// The store could not be reached (its breaker is open, or a call failed
    /// at the connection level or timed out).
    #[error(transparent)]
    Unavailable(#[from] crate::breaker::Unavailable),
    /// The store failed.
    #[error("blob store: {0}")]
    Store(#[from] object_store::Error),
    /// A local file operation failed.
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
}

/// A stored blob's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    lower_hex(&Sha256::digest(bytes))
}

/// Lowercase hex of a digest.
pub(crate) fn lower_hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The backend name blob-store errors and metrics use.
pub const BACKEND: &str = "blob store";
/// How long one request to S3 may take (connect to last byte), by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long S3 requests are retried after the first attempt, by default
/// (object_store's own default is 3 minutes).
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of one S3 request at most, by default.
pub const DEFAULT_MAX_RETRIES: usize = 3;

/// How an S3 store is reached and how long its calls may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    /// One request, connect to last byte.
    pub request_timeout: Duration,
    /// Retrying a failed request, from its first attempt.
    pub retry_timeout: Duration,
    /// Retries of one request.
    pub max_retries: usize,
    /// The endpoint, overriding `AWS_ENDPOINT` (None: the environment's).
    pub endpoint: Option<String>,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry_timeout: DEFAULT_RETRY_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            endpoint: None,
        }
    }
}

/// A content-addressed blob store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    /// Root directory of a local store (for fsync).
    local_root: Option<PathBuf>,
    url: String,
    /// The breaker reads and writes pass (S3 in a server).
    guard: Option<BackendGuard>,
}

impl BlobStore {
    /// Opens the store a URL names: `s3://bucket[/prefix]`, `file:///dir`
    /// or a plain directory path (created if missing).
    pub fn open(url: &str) -> Result<Self, BlobError> {
        Self::open_with(url, &S3Options::default())
    }

    /// [`Self::open`] with the given S3 settings.
    pub fn open_with(url: &str, options: &S3Options) -> Result<Self, BlobError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(BlobError::InvalidUrl(format!("{url:?} names no bucket")));
            }
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                // Set key by key: the environment's client options (AWS_ALLOW_HTTP …) stay.
                .with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                    humantime::format_duration(options.request_timeout).to_string(),
                )
                .with_retry(RetryConfig {
                    max_retries: options.max_retries,
                    retry_timeout: options.retry_timeout,
                    ..Default::default()
                });
            if let Some(endpoint) = &options.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            let store = builder.build()?;
            return Ok(Self {
                store: Arc::new(store),
                prefix: StorePath::from(prefix.trim_matches('/')),
                local_root: None,
                url: url.to_owned(),
                guard: None,
            });
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(BlobError::InvalidUrl(format!(
                "unsupported blob store URL {url:?}: expected s3://bucket/prefix or a directory"
            )));
        }
        Self::local(Path::new(url.strip_prefix("file://").unwrap_or(url)))
    }

    /// A store in a local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Self, BlobError> {
        std::fs::create_dir_all(dir)?;
        let root = dir.canonicalize()?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new_with_prefix(&root)?),
            prefix: StorePath::default(),
            url: root.display().to_string(),
            local_root: Some(root),
            guard: None,
        })
    }

    /// Passes reads and writes through `guard`: once the store stops
    /// answering they are refused at once, and the guard's probe
    /// ([`Self::spawn_probe`]) finds its return.
    pub fn with_guard(mut self, guard: BackendGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// The breaker, if the store has one.
    pub fn guard(&self) -> Option<&BackendGuard> {
        self.guard.as_ref()
    }

    /// Starts the breaker's probe (a HEAD of a key no blob uses, every probe
    /// interval while the breaker is open); it ends once every clone of
    /// this store is dropped. Needs a Tokio runtime; no-op without a guard.
    pub fn spawn_probe(&self) {
        let Some(guard) = self.guard.clone() else {
            return;
        };
        let store = Arc::downgrade(&self.store);
        let gone = store.clone();
        let key = self.space("probe");
        let probe = move || {
            let (store, key) = (store.upgrade(), key.clone());
            async move {
                let Some(store) = store else {
                    return Outcome::Answered;
                };
                // Any answer from the store, even a refusal, says it is up.
                match store.head(&key).await {
                    Err(e @ object_store::Error::Generic { .. }) => {
                        Outcome::Unreachable(e.to_string())
                    }
                    _ => Outcome::Answered,
                }
            }
        };
        tokio::spawn(guard.watch(probe, crate::breaker::dropped(gone)));
    }

    /// Runs a store call through the breaker, if there is one.
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, BlobError>>,
    ) -> Result<T, BlobError> {
        match &self.guard {
            None => call.await,
            Some(guard) => {
                let result = guard
                    .run(call, unreachable_cause, BlobError::Unavailable)
                    .await;
                result.map_err(|e| match unreachable_cause(&e) {
                    Some(cause) if !matches!(e, BlobError::Unavailable(_)) => {
                        BlobError::Unavailable(Unavailable {
                            backend: BACKEND,
                            cause,
                        })
                    }
                    _ => e,
                })
            }
        }
    }

    /// Where the store is, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, sha256: &str) -> StorePath {
        let name = format!("sha256/{}/{sha256}", &sha256[..2]);
        if self.prefix.as_ref().is_empty() {
            StorePath::from(name)
        } else {
            StorePath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn named_key(&self, name: &str) -> Result<StorePath, BlobError> {
        let valid = !name.is_empty()
            && name.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            });
        if !valid {
            return Err(BlobError::InvalidName(name.to_owned()));
        }
        Ok(if self.prefix.as_ref().is_empty() {
            StorePath::from(format!("named/{name}"))
        } else {
            StorePath::from(format!("{}/named/{name}", self.prefix))
        })
    }

    /// Writes `bytes` at `key` and, on a local disk, fsyncs file and directory.
    async fn put_durably(&self, key: &StorePath, bytes: Bytes) -> Result<(), BlobError> {
        self.guarded(async {
            Ok::<_, BlobError>(self.store.put(key, PutPayload::from(bytes)).await?)
        })
        .await?;
        if let Some(root) = &self.local_root {
            let path = root.join(key.as_ref());
            tokio::task::spawn_blocking(move || sync_file_and_parent(&path))
                .await
                .map_err(|e| BlobError::Io(std::io::Error::other(e)))??;
        }
        Ok(())
    }

    fn checked(sha256: &str) -> Result<(), BlobError> {
        if is_sha256(sha256) {
            Ok(())
        } else {
            Err(BlobError::InvalidHash(sha256.to_owned()))
        }
    }

    /// Stores `bytes` under their hash and returns once they are durable.
    /// Storing the same bytes again rewrites them (repairing a damaged copy).
    pub async fn put(&self, bytes: Bytes) -> Result<BlobRef, BlobError> {
        let sha256 = sha256_hex(&bytes);
        let size = bytes.len() as u64;
        self.put_durably(&self.key(&sha256), bytes).await?;
        Ok(BlobRef { sha256, size })
    }

    /// The bytes stored under `sha256`, verified.
    pub async fn get(&self, sha256: &str) -> Result<Bytes, BlobError> {
        Self::checked(sha256)?;
        let bytes = self
            .guarded(async {
                match self.store.get(&self.key(sha256)).await {
                    Ok(result) => Ok(result.bytes().await?),
                    Err(object_store::Error::NotFound { .. }) => {
                        Err(BlobError::NotFound(sha256.to_owned()))
                    }
                    Err(e) => Err(e.into()),
                }
            })
            .await?;
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            return Err(BlobError::Corrupt {
                expected: sha256.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Whether a blob is stored (without reading it).
    pub async fn exists(&self, sha256: &str) -> Result<bool, BlobError> {
        Self::checked(sha256)?;
        self.guarded(async {
            match self.store.head(&self.key(sha256)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Removes a blob (no error if absent).
    pub async fn delete(&self, sha256: &str) -> Result<(), BlobError> {
        Self::checked(sha256)?;
        match self.store.delete(&self.key(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a small mutable object under `name` (outside the
    /// content-addressed space: pointers, reports); replaces it atomically
    /// and returns once it is durable.
    pub async fn put_named(&self, name: &str, bytes: Bytes) -> Result<(), BlobError> {
        self.put_durably(&self.named_key(name)?, bytes).await
    }

    /// The object under `name`, if any.
    pub async fn get_named(&self, name: &str) -> Result<Option<Bytes>, BlobError> {
        let key = self.named_key(name)?;
        self.guarded(async {
            match self.store.get(&key).await {
                Ok(result) => Ok(Some(result.bytes().await?)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Removes the object under `name` (no error if absent).
    pub async fn delete_named(&self, name: &str) -> Result<(), BlobError> {
        match self.store.delete(&self.named_key(name)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Hashes of every stored blob, sorted.
    pub async fn list(&self) -> Result<Vec<String>, BlobError> {
        Ok(self.stored().await?.into_iter().map(|b| b.sha256).collect())
    }
}

/// A stored blob as a sweep sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    /// Lowercase hex SHA-256 (the key).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// A partial write a killed process left behind: a local store writes
/// `KEY#N` and renames it to `KEY` when complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingFile {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

impl BlobStore {
    /// Every stored blob with its size and write time, sorted by hash.
    pub async fn stored(&self) -> Result<Vec<StoredBlob>, BlobError> {
        let mut blobs: Vec<StoredBlob> = self
            .store
            .list(Some(&self.space("sha256")))
            .try_filter_map(|meta| async move {
                Ok(meta
                    .location
                    .filename()
                    .filter(|name| is_sha256(name))
                    .map(|name| StoredBlob {
                        sha256: name.to_owned(),
                        size: meta.size,
                        modified: SystemTime::from(meta.last_modified),
                    }))
            })
            .try_collect()
            .await?;
        blobs.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        Ok(blobs)
    }

    /// When the blob `sha256` was last written; None if it is not stored.
    pub async fn modified(&self, sha256: &str) -> Result<Option<SystemTime>, BlobError> {
        Self::checked(sha256)?;
        match self.store.head(&self.key(sha256)).await {
            Ok(meta) => Ok(Some(SystemTime::from(meta.last_modified))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Names of the named objects under `under/` (e.g. "training").
    pub async fn named_under(&self, under: &str) -> Result<Vec<String>, BlobError> {
        let base = self.named_key(under)?;
        let named = self.space("named");
        self.store
            .list(Some(&base))
            .map_ok(|meta| {
                let parts: Vec<String> = meta
                    .location
                    .prefix_match(&named)
                    .map(|rest| rest.map(|p| p.as_ref().to_owned()).collect())
                    .unwrap_or_default();
                parts.join("/")
            })
            .try_collect()
            .await
            .map_err(BlobError::from)
    }

    /// Partial writes in a local store's blob space (an S3 PUT is atomic and
    /// leaves none); empty for S3. The directory walk runs off the async
    /// workers.
    pub async fn staging_files(&self) -> Result<Vec<StagingFile>, BlobError> {
        let Some(root) = &self.local_root else {
            return Ok(Vec::new());
        };
        let top = root.join(self.space("sha256").as_ref());
        tokio::task::spawn_blocking(move || walk_staging(top, is_staging_name))
            .await
            .map_err(|e| BlobError::Io(std::io::Error::other(e)))?
    }

    /// Removes a partial write (no error if it is already gone).
    pub async fn remove_staging(&self, file: &StagingFile) -> Result<(), BlobError> {
        match tokio::fs::remove_file(&file.path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// `space` under the store's prefix.
    fn space(&self, space: &str) -> StorePath {
        if self.prefix.as_ref().is_empty() {
            StorePath::from(space)
        } else {
            StorePath::from(format!("{}/{space}", self.prefix))
        }
    }
}

/// The `KEY#N` files under `top`, sorted by path.
fn walk_staging(top: PathBuf, is_staging: fn(&str) -> bool) -> Result<Vec<StagingFile>, BlobError> {
    let mut found = Vec::new();
    let mut dirs = vec![top];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if is_staging(&entry.file_name().to_string_lossy()) {
                found.push(StagingFile {
                    path: entry.path(),
                    size: meta.len(),
                    modified: meta.modified()?,
                });
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

/// `KEY#DIGITS`: object_store's name for a local write in progress.
fn is_staging_name(name: &str) -> bool {
    match name.rsplit_once('#') {
        Some((key, n)) => !key.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// fsync of a file and of its directory (so the rename that created it is
/// durable too).
fn sync_file_and_parent(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256(&sha256_hex(b"")));
        assert!(!is_sha256("ABC"));
        assert!(is_staging_name(&format!("{}#1", sha256_hex(b""))));
        assert!(is_staging_name("abc#12"));
        for name in ["abc", "abc#", "#1", "abc#1x", &sha256_hex(b"")] {
            assert!(!is_staging_name(name), "{name}");
        }
    }

    #[test]
    fn unsupported_urls_are_refused_by_name() {
        let err = BlobStore::open("gs://bucket/x").unwrap_err().to_string();
        assert!(err.contains("gs://bucket/x"), "{err}");
        assert!(BlobStore::open("s3://").is_err());
    }
}
