//! The thread that owns every loaded denoiser and runs all tch work of the
//! server: loading checkpoints, reverse diffusion, encoding samples as
//! safetensors. Async code talks to it through a channel and gets plain
//! bytes back, so no tensor ever crosses an `.await`.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Instant;

use bytes::Bytes;
use tch::{Device, Tensor};
use tokio::sync::oneshot;

use crate::diffusion::SamplerKind;
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::tasks::featurizer::{Descriptor, FeatureError};
use crate::tasks::schema::FeatureSchema;
use crate::weights::{ArchSpec, DType, encode_tensors, unflatten};

/// What a loaded checkpoint is, for the async side (no tensors).
#[derive(Debug, Clone)]
pub struct CheckpointFacts {
    /// Architecture of the generated weights.
    pub arch: ArchSpec,
    /// Conditioning inputs.
    pub schema: FeatureSchema,
    /// T.
    pub timesteps: usize,
    /// "cosine" / "linear".
    pub schedule: String,
    /// "mlp_unet" / "layer_transformer".
    pub kind: String,
    /// Latent size (0 = the standardized weights).
    pub latent_dim: usize,
}

/// One generation: a task, the samples' seeds and how to sample.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// The task (already validated against the schema).
    pub descriptor: Descriptor,
    /// Feature values in schema order.
    pub features: Vec<f32>,
    /// Classes of a classification support set.
    pub ways: usize,
    /// One seed per sample.
    pub seeds: Vec<u64>,
    /// Sampler.
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Element type of the returned tensors.
    pub dtype: DType,
}

/// Generated samples, each a safetensors file.
#[derive(Debug)]
pub struct Generated {
    /// One file per seed.
    pub files: Vec<Bytes>,
    /// Time in reverse diffusion and encoding.
    pub sampling_ms: f64,
}

/// Why the model thread could not do a job.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The task does not fit the denoiser (support set shapes).
    #[error(transparent)]
    Feature(#[from] FeatureError),
    /// The denoiser is not loaded.
    #[error("denoiser {0:?} is not loaded")]
    NotLoaded(String),
    /// The checkpoint cannot be read.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// libtorch failed (the thread keeps serving).
    #[error("libtorch: {0}")]
    Torch(String),
    /// The thread is gone.
    #[error("the model thread has stopped")]
    Stopped,
}

enum Message {
    Load {
        id: String,
        bytes: Bytes,
        reply: oneshot::Sender<Result<CheckpointFacts, ModelError>>,
    },
    Unload {
        id: String,
    },
    Generate {
        id: String,
        job: Box<GenerateJob>,
        reply: oneshot::Sender<Result<Generated, ModelError>>,
    },
}

/// Handle to the model thread; clones share it. The thread stops when the
/// last handle is dropped.
#[derive(Debug, Clone)]
pub struct ModelThread {
    tx: mpsc::Sender<Message>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Load { id, .. } => write!(f, "Load({id})"),
            Self::Unload { id } => write!(f, "Unload({id})"),
            Self::Generate { id, .. } => write!(f, "Generate({id})"),
        }
    }
}

impl ModelThread {
    /// Starts the thread; models live on `device`.
    pub fn spawn(device: Device) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("weightgen-model".into())
            .spawn(move || serve(rx, device))?;
        Ok(Self { tx })
    }

    /// Loads (parses, places on the device) a checkpoint under `id`.
    pub async fn load(&self, id: &str, bytes: Bytes) -> Result<CheckpointFacts, ModelError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Load {
                id: id.to_owned(),
                bytes,
                reply,
            })
            .map_err(|_| ModelError::Stopped)?;
        answer.await.map_err(|_| ModelError::Stopped)?
    }

    /// Frees a loaded checkpoint (queued after every job already sent).
    pub fn unload(&self, id: &str) {
        let _ = self.tx.send(Message::Unload { id: id.to_owned() });
    }

    /// Runs `job` on denoiser `id`.
    pub async fn generate(&self, id: &str, job: GenerateJob) -> Result<Generated, ModelError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Generate {
                id: id.to_owned(),
                job: Box::new(job),
                reply,
            })
            .map_err(|_| ModelError::Stopped)?;
        answer.await.map_err(|_| ModelError::Stopped)?
    }
}

fn serve(rx: mpsc::Receiver<Message>, device: Device) {
    let mut loaded: HashMap<String, DenoiserCheckpoint> = HashMap::new();
    while let Ok(message) = rx.recv() {
        match message {
            Message::Load { id, bytes, reply } => {
                let result = guarded(|| {
                    DenoiserCheckpoint::from_bytes(&bytes, device)
                        .map_err(|e| ModelError::Checkpoint(e.to_string()))
                })
                .map(|checkpoint| {
                    let facts = facts(&checkpoint);
                    loaded.insert(id.clone(), checkpoint);
                    facts
                });
                let _ = reply.send(result);
            }
            Message::Unload { id } => {
                if loaded.remove(&id).is_some() {
                    tracing::info!(denoiser = %id, "denoiser unloaded");
                }
            }
            Message::Generate { id, job, reply } => {
                // A client that went away no longer waits for the answer.
                if reply.is_closed() {
                    continue;
                }
                let result = match loaded.get(&id) {
                    Some(checkpoint) => guarded(|| run(checkpoint, &job)),
                    None => Err(ModelError::NotLoaded(id)),
                };
                let _ = reply.send(result);
            }
        }
    }
}

/// Runs `work`, turning a libtorch panic (tch unwraps its errors) into an
/// error for this request instead of the end of the thread.
fn guarded<T>(work: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(result) => result,
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            let first_line = reason.lines().next().unwrap_or_default().to_owned();
            tracing::error!(reason = %first_line, "libtorch failed on the model thread");
            Err(ModelError::Torch(first_line))
        }
    }
}

fn facts(checkpoint: &DenoiserCheckpoint) -> CheckpointFacts {
    let config = checkpoint.model.config();
    let kind = serde_json::to_value(&config.net)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "mlp_unet".to_owned());
    let schedule = serde_json::to_value(config.schedule)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    CheckpointFacts {
        arch: checkpoint.arch.clone(),
        schema: checkpoint.feature_schema.clone(),
        timesteps: config.timesteps,
        schedule,
        kind,
        latent_dim: checkpoint
            .latent
            .as_ref()
            .map_or(0, |l| l.components.size()[0] as usize),
    }
}

/// The condition of `job` for `rows` samples, standardized as in training.
fn condition(
    checkpoint: &DenoiserCheckpoint,
    job: &GenerateJob,
    rows: i64,
) -> Result<TaskBatch, FeatureError> {
    let device = checkpoint.model.device();
    let features = Tensor::from_slice(&job.features).view([1, -1]);
    let features = match &checkpoint.feature_norm {
        Some(norm) => crate::train::standardize_features(&features, norm),
        None => features,
    };
    let support = job
        .descriptor
        .support_tensors(&checkpoint.feature_schema, job.ways)?;
    let repeat = |t: Tensor| {
        let mut shape = vec![rows];
        shape.extend(std::iter::repeat_n(1, t.dim()));
        t.unsqueeze(0).repeat(shape.as_slice()).to_device(device)
    };
    let features = features.squeeze_dim(0);
    Ok(TaskBatch {
        features: (!job.features.is_empty()).then(|| repeat(features)),
        support_x: support.as_ref().map(|(x, _)| repeat(x.shallow_clone())),
        support_y: support.as_ref().map(|(_, y)| repeat(y.shallow_clone())),
    })
}

fn run(checkpoint: &DenoiserCheckpoint, job: &GenerateJob) -> Result<Generated, ModelError> {
    let began = Instant::now();
    let rows = job.seeds.len() as i64;
    let condition = condition(checkpoint, job, rows)?;
    let flat = checkpoint
        .generate(&condition, &job.seeds, job.sampler, job.guidance)
        .to_device(Device::Cpu);
    let mut files = Vec::with_capacity(job.seeds.len());
    for i in 0..rows {
        let tensors = unflatten(&checkpoint.arch, &flat.get(i))
            .map_err(|e| ModelError::Checkpoint(e.to_string()))?
            .into_iter()
            .map(|(name, t)| (name, t.to_kind(job.dtype.kind()).contiguous()))
            .collect::<Vec<_>>();
        let bytes = encode_tensors(&tensors, &HashMap::new())
            .map_err(|e| ModelError::Checkpoint(e.to_string()))?;
        files.push(Bytes::from(bytes));
    }
    Ok(Generated {
        files,
        sampling_ms: began.elapsed().as_secs_f64() * 1e3,
    })
}
