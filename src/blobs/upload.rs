//! An upload received in pieces, kept out of memory: each chunk is appended
//! to a file in a staging directory and hashed on the way. Once complete the
//! file is mapped (its pages belong to the page cache, which the kernel can
//! drop, not to the process) and unlinked at once, so the bytes live only as
//! long as the mapping and a finished, failed or cancelled upload leaves
//! nothing on disk. Only a process killed mid-upload leaves a
//! `upload-*.part` file, which the sweep ([`crate::gc`]) removes.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{BlobError, StagingFile};

/// Name prefix and suffix of staged uploads.
const PREFIX: &str = "upload-";
const SUFFIX: &str = ".part";

/// An upload in progress.
#[derive(Debug)]
pub struct StagedUpload {
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    len: u64,
}

impl StagedUpload {
    /// A new, empty staged file in `dir` (created if missing).
    pub async fn create(dir: &Path) -> Result<Self, BlobError> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join(format!("{PREFIX}{:016x}{SUFFIX}", rand::random::<u64>()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        Ok(Self {
            path,
            file,
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Appends a chunk.
    pub async fn append(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.file.write_all(chunk).await?;
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The complete upload: its bytes (mapped from the file, which is
    /// already unlinked) and their lowercase hex SHA-256.
    pub async fn finish(mut self) -> Result<(Bytes, String), BlobError> {
        self.file.flush().await?;
        let sha256 = super::lower_hex(&std::mem::take(&mut self.hasher).finalize());
        if self.len == 0 {
            return Ok((Bytes::new(), sha256));
        }
        let path = self.path.clone();
        let map = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)?;
            // SAFETY: the file is private to this upload (a random name,
            // created exclusively, unlinked right after) and nothing writes
            // it once it is mapped, so the mapped bytes cannot change.
            let map = unsafe { memmap2::Mmap::map(&file)? };
            std::fs::remove_file(&path)?;
            Ok::<_, std::io::Error>(map)
        })
        .await
        .map_err(|e| BlobError::Io(std::io::Error::other(e)))??;
        Ok((Bytes::from_owner(map), sha256))
    }
}

impl Drop for StagedUpload {
    fn drop(&mut self) {
        // Gone already once finished; otherwise the upload was abandoned.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Staged uploads a killed process left in `dir`.
pub async fn leftovers(dir: &Path) -> Result<Vec<StagingFile>, BlobError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || super::walk_staging(dir, is_upload_name))
        .await
        .map_err(|e| BlobError::Io(std::io::Error::other(e)))?
}

fn is_upload_name(name: &str) -> bool {
    name.starts_with(PREFIX) && name.ends_with(SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_upload_is_hashed_mapped_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        let mut upload = StagedUpload::create(&staging).await.unwrap();
        upload.append(b"hello ").await.unwrap();
        upload.append(b"world").await.unwrap();
        assert_eq!(upload.len(), 11);
        assert_eq!(leftovers(&staging).await.unwrap().len(), 1);
        let (bytes, sha256) = upload.finish().await.unwrap();
        assert_eq!(&bytes[..], b"hello world");
        assert_eq!(sha256, super::super::sha256_hex(b"hello world"));
        assert!(leftovers(&staging).await.unwrap().is_empty());

        let mut abandoned = StagedUpload::create(&staging).await.unwrap();
        abandoned.append(b"partial").await.unwrap();
        drop(abandoned);
        assert!(leftovers(&staging).await.unwrap().is_empty());
        assert!(
            leftovers(&dir.path().join("missing"))
                .await
                .unwrap()
                .is_empty()
        );
    }
}
