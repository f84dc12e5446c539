//! Checkpoints of a training run in progress, so that a run killed at any
//! moment resumes where its last checkpoint left it: the live weights, the
//! EMA, Adam's moments, the loss scale and the data-order position (the RNG
//! of every batch is a function of seed and position), plus the loss curve.
//!
//! A checkpoint is one safetensors blob in the content-addressed store; the
//! named object `training/<denoiser id>/state` points at the latest one and
//! is replaced only after the blob is durable, so a crash mid-save leaves
//! the previous checkpoint in force.

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::TrainError;
use crate::blobs::BlobStore;
use crate::model::TrainerPosition;
use crate::weights::{decode_tensors, encode_tensors};

/// Format tag in the safetensors header.
pub const FORMAT: &str = "weightgen-training-state/1";

/// One training-run checkpoint.
#[derive(Debug)]
pub struct RunState {
    /// Training steps completed.
    pub step: usize,
    /// Optimizer and data-order position.
    pub position: TrainerPosition,
    /// (step, train loss, validation loss) at each log point so far.
    pub curve: Vec<(usize, f64, f64)>,
    /// Losses since the last log point.
    pub recent: Vec<f64>,
    /// The settings that shape the run; a resume must match them.
    pub fingerprint: serde_json::Value,
    /// "model.*", "ema.*" and "adam.*" tensors.
    pub tensors: HashMap<String, Tensor>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    step: usize,
    position: TrainerPosition,
    curve: Vec<(usize, f64, f64)>,
    recent: Vec<f64>,
    fingerprint: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct Pointer {
    sha256: String,
    step: usize,
}

fn corrupt(reason: impl std::fmt::Display) -> TrainError {
    TrainError::Input {
        field: "resume",
        reason: format!("training checkpoint unreadable: {reason}"),
    }
}

impl RunState {
    /// Encodes the state as one safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, TrainError> {
        let mut tensors: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let header = Header {
            step: self.step,
            position: self.position,
            curve: self.curve.clone(),
            recent: self.recent.clone(),
            fingerprint: self.fingerprint.clone(),
        };
        let mut meta = HashMap::new();
        meta.insert("format".to_owned(), FORMAT.to_owned());
        meta.insert(
            "run".to_owned(),
            serde_json::to_string(&header).map_err(corrupt)?,
        );
        Ok(encode_tensors(&tensors, &meta)?)
    }

    /// Decodes a state written by `to_bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TrainError> {
        let (tensors, meta) = decode_tensors(bytes)?;
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(corrupt(format!(
                "format {:?}, expected {FORMAT:?}",
                meta.get("format")
            )));
        }
        let header: Header =
            serde_json::from_str(meta.get("run").ok_or_else(|| corrupt("no run header"))?)
                .map_err(corrupt)?;
        Ok(Self {
            step: header.step,
            position: header.position,
            curve: header.curve,
            recent: header.recent,
            fingerprint: header.fingerprint,
            tensors,
        })
    }

    /// The saved tensor `prefix.name`, if present.
    pub fn tensor(&self, prefix: &str, name: &str) -> Option<Tensor> {
        self.tensors
            .get(&format!("{prefix}.{name}"))
            .map(Tensor::shallow_clone)
    }
}

/// Name of the object that holds a run's artifacts.
pub fn run_object(denoiser_id: &str, file: &str) -> String {
    format!("training/{denoiser_id}/{file}")
}

/// Saves `state` as the run's latest checkpoint and drops the one before.
pub async fn save(
    blobs: &BlobStore,
    denoiser_id: &str,
    state: &RunState,
) -> Result<(), TrainError> {
    let pointer_name = run_object(denoiser_id, "state");
    let previous = read_pointer(blobs, &pointer_name).await?;
    let stored = blobs.put(Bytes::from(state.to_bytes()?)).await?;
    let pointer = Pointer {
        sha256: stored.sha256.clone(),
        step: state.step,
    };
    let json = serde_json::to_vec(&pointer).map_err(corrupt)?;
    blobs.put_named(&pointer_name, Bytes::from(json)).await?;
    if let Some(old) = previous.filter(|p| p.sha256 != stored.sha256) {
        blobs.delete(&old.sha256).await?;
    }
    Ok(())
}

async fn read_pointer(blobs: &BlobStore, name: &str) -> Result<Option<Pointer>, TrainError> {
    match blobs.get_named(name).await? {
        None => Ok(None),
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(corrupt)?)),
    }
}

/// Blobs the saved training runs point at (each run's latest state): live
/// although no catalog row refers to them.
pub async fn referenced_states(blobs: &BlobStore) -> Result<Vec<String>, TrainError> {
    let mut hashes = Vec::new();
    for name in blobs.named_under("training").await? {
        if name.ends_with("/state")
            && let Some(pointer) = read_pointer(blobs, &name).await?
        {
            hashes.push(pointer.sha256);
        }
    }
    Ok(hashes)
}

/// The run's latest checkpoint, if it has one.
pub async fn load(blobs: &BlobStore, denoiser_id: &str) -> Result<Option<RunState>, TrainError> {
    let Some(pointer) = read_pointer(blobs, &run_object(denoiser_id, "state")).await? else {
        return Ok(None);
    };
    let bytes = blobs.get(&pointer.sha256).await?;
    RunState::from_bytes(&bytes).map(Some)
}

/// Step of the run's latest checkpoint, if any (without reading it).
pub async fn latest_step(
    blobs: &BlobStore,
    denoiser_id: &str,
) -> Result<Option<usize>, TrainError> {
    Ok(read_pointer(blobs, &run_object(denoiser_id, "state"))
        .await?
        .map(|p| p.step))
}

/// Removes the run's checkpoint once its denoiser is published.
pub async fn clear(blobs: &BlobStore, denoiser_id: &str) -> Result<(), TrainError> {
    let pointer_name = run_object(denoiser_id, "state");
    if let Some(pointer) = read_pointer(blobs, &pointer_name).await? {
        blobs.delete_named(&pointer_name).await?;
        blobs.delete(&pointer.sha256).await?;
    }
    Ok(())
}
