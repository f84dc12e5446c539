//! The thread that owns every loaded denoiser and runs all tch work of the
//! server: loading checkpoints, reverse diffusion, encoding samples as
//! safetensors. Async code talks to it through a channel and gets plain
//! bytes back, so no tensor ever crosses an `.await`.
//!
//! Generation is batched: the first waiting request, the compatible ones
//! behind it (same denoiser, sampler, guidance and support-set size) and
//! those arriving while the batch is smaller than the previous one (for at
//! most `max_wait`) share one reverse diffusion of up to `max_batch`
//! samples. A lone client is served at once (its previous batch held one
//! sample); under steady concurrent load the batch waits for the clients
//! that are still receiving the previous answers instead of running half
//! empty. Each sample's noise comes from its own seed, so a
//! request's bytes do not depend on what it was batched with.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use bytes::Bytes;
use tch::{Device, Tensor};
use tokio::sync::oneshot;

use crate::diffusion::SamplerKind;
use crate::diffusion::noise::splitmix64;
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::tasks::featurizer::{Descriptor, FeatureError};
use crate::tasks::schema::FeatureSchema;
use crate::weights::{ArchSpec, DType, Nearness, ZooSpread, encode_tensors, unflatten};

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
    /// The zoo spread of the memorization guard, with the reference's
    /// size, when the checkpoint carries a zoo reference.
    pub zoo_spread: Option<(ZooSpread, usize)>,
    /// Labels of the classification support sets the encoder reads (the
    /// classes of the generated classifier), when it reads them.
    pub support_labels: Option<usize>,
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
    /// Most times a sample too close to a zoo model is redrawn (checked
    /// against `MAX_REDRAWS` and the checkpoint before queueing).
    pub max_redraws: u32,
}

/// Most redraws per sample the memorization guard allows.
pub const MAX_REDRAWS: u32 = 8;

/// A sample's nearness to the training zoo and how often it was redrawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleNearness {
    /// Nearest-zoo cosine and L2.
    pub nearness: Nearness,
    /// Still closer than the zoo's spread allows.
    pub too_close: bool,
    /// Redraws it took.
    pub redraws: u32,
}

/// Generated samples, each a safetensors file.
#[derive(Debug)]
pub struct Generated {
    /// One file per seed.
    pub files: Vec<Bytes>,
    /// Time in reverse diffusion and encoding (of the whole batch).
    pub sampling_ms: f64,
    /// Time the request waited before its batch started.
    pub queue_ms: f64,
    /// Samples in the batch this request was sampled in.
    pub batch_size: usize,
    /// Each sample's nearness to the zoo, when the checkpoint carries a
    /// zoo reference.
    pub nearness: Option<Vec<SampleNearness>>,
}

/// How the model thread merges requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    /// Most samples one reverse diffusion runs.
    pub max_batch: usize,
    /// Longest the first request of a batch waits for others, while the
    /// batch is smaller than the previous one.
    pub max_wait: std::time::Duration,
    /// Requests that may wait; past it new ones are refused at once.
    pub max_queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: DEFAULT_MAX_BATCH,
            max_wait: DEFAULT_MAX_WAIT,
            max_queue: DEFAULT_MAX_QUEUE,
        }
    }
}

/// Default most samples per batch.
pub const DEFAULT_MAX_BATCH: usize = 64;
/// Default longest wait for a batch to fill (a DDIM-50 batch of the digits
/// denoiser takes ~300 ms on 2 CPU cores: waiting 20 ms for its clients is
/// cheaper than running it half empty).
pub const DEFAULT_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(20);
/// Default requests that may wait.
pub const DEFAULT_MAX_QUEUE: usize = 256;

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
    /// A sample came out with NaN or infinite values: never returned.
    #[error(
        "task: the conditioning drove the denoiser out of finite arithmetic (NaN or infinite \
         weights); support values or guidance far outside what the denoiser was trained on"
    )]
    NonFinite,
    /// Too many requests are waiting.
    #[error("the generation queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
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
    Generate(Box<Pending>),
}

/// A generation waiting for its batch.
struct Pending {
    id: String,
    job: GenerateJob,
    reply: oneshot::Sender<Result<Generated, ModelError>>,
    enqueued: Instant,
}

impl Pending {
    /// Whether `other` can share this one's reverse diffusion: same
    /// denoiser, sampler, guidance and support-set size, and both with
    /// features or both conditioned on their support set alone.
    fn joins(&self, other: &Pending) -> bool {
        self.id == other.id
            && self.job.sampler == other.job.sampler
            && self.job.guidance.to_bits() == other.job.guidance.to_bits()
            && self.job.descriptor.support_x.len() == other.job.descriptor.support_x.len()
            && self.job.ways == other.job.ways
            && self.job.features.is_empty() == other.job.features.is_empty()
    }
}

/// Handle to the model thread; clones share it. The thread stops when the
/// last handle is dropped.
#[derive(Debug, Clone)]
pub struct ModelThread {
    tx: mpsc::Sender<Message>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Load { id, .. } => write!(f, "Load({id})"),
            Self::Unload { id } => write!(f, "Unload({id})"),
            Self::Generate(p) => write!(f, "Generate({})", p.id),
        }
    }
}

impl ModelThread {
    /// Starts the thread; models live on `device`.
    pub fn spawn(device: Device, batching: BatchConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let counter = queued.clone();
        std::thread::Builder::new()
            .name("weightgen-model".into())
            .spawn(move || serve(rx, device, batching, counter))?;
        Ok(Self {
            tx,
            queued,
            max_queue: batching.max_queue,
        })
    }

    /// Requests waiting for a batch.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
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

    /// Runs `job` on denoiser `id`, batched with concurrent compatible
    /// requests. A full queue answers `QueueFull` at once; dropping the
    /// returned future (a client that went away) drops the queued work.
    pub async fn generate(&self, id: &str, job: GenerateJob) -> Result<Generated, ModelError> {
        let waiting = self.queued.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("weightgen_generate_rejected_total", "reason" => "queue_full")
                .increment(1);
            return Err(ModelError::QueueFull(self.max_queue));
        }
        metrics::gauge!("weightgen_queue_depth").set((waiting + 1) as f64);
        let (reply, answer) = oneshot::channel();
        let sent = self.tx.send(Message::Generate(Box::new(Pending {
            id: id.to_owned(),
            job,
            reply,
            enqueued: Instant::now(),
        })));
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(ModelError::Stopped);
        }
        answer.await.map_err(|_| ModelError::Stopped)?
    }
}

fn serve(
    rx: mpsc::Receiver<Message>,
    device: Device,
    batching: BatchConfig,
    queued: Arc<AtomicUsize>,
) {
    let mut loaded: HashMap<String, DenoiserCheckpoint> = HashMap::new();
    // Messages read while filling a batch that did not join it, in order.
    let mut backlog: VecDeque<Message> = VecDeque::new();
    // Samples in the previous batch: how many the next one waits for.
    let mut expected_rows = 1usize;
    loop {
        let message = match backlog.pop_front() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
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
            Message::Generate(first) => {
                let batch = fill_batch(*first, &rx, &mut backlog, batching, expected_rows);
                expected_rows = batch.iter().map(|p| p.job.seeds.len()).sum();
                let left = queued.fetch_sub(batch.len(), Ordering::SeqCst) - batch.len();
                metrics::gauge!("weightgen_queue_depth").set(left as f64);
                run_batch(&loaded, batch);
            }
        }
    }
}

/// `first` and the compatible requests already waiting, then those arriving
/// until the batch holds `expected_rows` samples (the previous batch's) or
/// `max_wait` has passed, up to `max_batch` samples. Others go to the
/// backlog.
fn fill_batch(
    first: Pending,
    rx: &mpsc::Receiver<Message>,
    backlog: &mut VecDeque<Message>,
    batching: BatchConfig,
    expected_rows: usize,
) -> Vec<Pending> {
    let max_batch = batching.max_batch;
    let mut rows = first.job.seeds.len();
    let mut batch = vec![first];
    for message in std::mem::take(backlog) {
        if let Some(other) = offer(&mut batch, &mut rows, max_batch, message) {
            backlog.push_back(other);
        }
    }
    // Everything already waiting joins, whatever the previous batch held.
    while rows < max_batch {
        let Ok(message) = rx.try_recv() else { break };
        if let Some(other) = offer(&mut batch, &mut rows, max_batch, message) {
            backlog.push_back(other);
        }
    }
    let deadline = Instant::now() + batching.max_wait;
    while rows < max_batch.min(expected_rows) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(message) = rx.recv_timeout(left) else {
            break;
        };
        if let Some(other) = offer(&mut batch, &mut rows, max_batch, message) {
            backlog.push_back(other);
        }
    }
    batch
}

/// Adds `message` to `batch` when it is a compatible request that fits in
/// `max_batch` samples; otherwise hands it back.
fn offer(
    batch: &mut Vec<Pending>,
    rows: &mut usize,
    max_batch: usize,
    message: Message,
) -> Option<Message> {
    match message {
        Message::Generate(p) if batch[0].joins(&p) && *rows + p.job.seeds.len() <= max_batch => {
            *rows += p.job.seeds.len();
            batch.push(*p);
            None
        }
        other => Some(other),
    }
}

/// Samples a batch in one reverse diffusion and answers each request with
/// its own samples. Requests whose client went away are dropped first;
/// one whose support set does not fit is answered with its error alone.
fn run_batch(loaded: &HashMap<String, DenoiserCheckpoint>, batch: Vec<Pending>) {
    let began = Instant::now();
    let (live, gone): (Vec<Pending>, Vec<Pending>) =
        batch.into_iter().partition(|p| !p.reply.is_closed());
    if !gone.is_empty() {
        metrics::counter!("weightgen_generate_dropped_total").increment(gone.len() as u64);
    }
    let Some(first) = live.first() else {
        return;
    };
    let Some(checkpoint) = loaded.get(&first.id) else {
        let id = first.id.clone();
        for p in live {
            let _ = p.reply.send(Err(ModelError::NotLoaded(id.clone())));
        }
        return;
    };
    let mut members = Vec::with_capacity(live.len());
    let mut conditions = Vec::with_capacity(live.len());
    for p in live {
        match guarded(|| Ok(condition(checkpoint, &p.job, p.job.seeds.len() as i64)?)) {
            Ok(c) => {
                conditions.push(c);
                members.push(p);
            }
            Err(e) => {
                let _ = p.reply.send(Err(e));
            }
        }
    }
    if members.is_empty() {
        return;
    }
    let seeds: Vec<u64> = members
        .iter()
        .flat_map(|p| p.job.seeds.iter().copied())
        .collect();
    let rows = seeds.len();
    metrics::histogram!("weightgen_batch_samples").record(rows as f64);
    let (sampler, guidance) = (members[0].job.sampler, members[0].job.guidance);
    let budgets: Vec<u32> = members
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.job.max_redraws, p.job.seeds.len()))
        .collect();
    let sampled = guarded(|| {
        let condition = concat(&conditions);
        let flat = checkpoint
            .generate(&condition, &seeds, sampler, guidance)
            .to_device(Device::Cpu);
        Ok(redraw_near_copies(
            checkpoint, flat, &condition, &seeds, &budgets, sampler, guidance,
        ))
    });
    let sampled_ms = began.elapsed().as_secs_f64() * 1e3;
    metrics::histogram!("weightgen_sampling_seconds").record(sampled_ms / 1e3);
    let mut offset = 0i64;
    for p in members {
        let n = p.job.seeds.len() as i64;
        let queue_ms = began.duration_since(p.enqueued).as_secs_f64() * 1e3;
        metrics::histogram!("weightgen_queue_wait_seconds").record(queue_ms / 1e3);
        let result = match &sampled {
            Ok((flat, _)) if !finite(&flat.narrow(0, offset, n)) => {
                metrics::counter!("weightgen_generate_rejected_total", "reason" => "non_finite")
                    .increment(1);
                Err(ModelError::NonFinite)
            }
            Ok((flat, nearness)) => {
                guarded(|| encode(checkpoint, &flat.narrow(0, offset, n), p.job.dtype)).map(
                    |files| Generated {
                        files,
                        sampling_ms: sampled_ms,
                        queue_ms,
                        batch_size: rows,
                        nearness: nearness
                            .as_ref()
                            .map(|all| all[offset as usize..(offset + n) as usize].to_vec()),
                    },
                )
            }
            Err(e) => Err(ModelError::Torch(e.to_string())),
        };
        offset += n;
        let _ = p.reply.send(result);
    }
}

/// Whether every value of `weights` is finite.
fn finite(weights: &Tensor) -> bool {
    weights.isfinite().all().int64_value(&[]) != 0
}

/// The seed of redraw `attempt` (1, 2, …) of the sample seeded `seed`: a
/// function of both, so a guarded request is as reproducible as any.
pub fn redraw_seed(seed: u64, attempt: u32) -> u64 {
    splitmix64(seed ^ splitmix64(0x9E37_79B9_7F4A_7C15 ^ u64::from(attempt)))
}

/// The memorization guard: scores each row of `flat` [B, D] against the
/// checkpoint's zoo reference and redraws the rows that are too close, as
/// long as their `budgets` allow (each round samples only those rows).
/// Without a zoo reference the weights are returned as they are.
fn redraw_near_copies(
    checkpoint: &DenoiserCheckpoint,
    mut flat: Tensor,
    condition: &TaskBatch,
    seeds: &[u64],
    budgets: &[u32],
    sampler: SamplerKind,
    guidance: f64,
) -> (Tensor, Option<Vec<SampleNearness>>) {
    let Some(reference) = &checkpoint.zoo_reference else {
        return (flat, None);
    };
    let spread = reference.spread;
    let mut scores = reference.nearest(&flat);
    let mut redraws = vec![0u32; seeds.len()];
    loop {
        let again: Vec<usize> = (0..seeds.len())
            .filter(|&i| spread.too_close(&scores[i]) && redraws[i] < budgets[i])
            .collect();
        if again.is_empty() {
            break;
        }
        metrics::counter!("weightgen_guard_redraws_total").increment(again.len() as u64);
        let fresh_seeds: Vec<u64> = again
            .iter()
            .map(|&i| {
                redraws[i] += 1;
                redraw_seed(seeds[i], redraws[i])
            })
            .collect();
        let rows: Vec<i64> = again.iter().map(|&i| i as i64).collect();
        let index = Tensor::from_slice(&rows);
        let fresh = checkpoint
            .generate(&condition.select(&index), &fresh_seeds, sampler, guidance)
            .to_device(Device::Cpu);
        for (k, n) in reference.nearest(&fresh).into_iter().enumerate() {
            scores[again[k]] = n;
        }
        flat = flat.index_copy(0, &index, &fresh);
    }
    let nearness: Vec<SampleNearness> = scores
        .into_iter()
        .zip(redraws)
        .map(|(nearness, redraws)| SampleNearness {
            too_close: spread.too_close(&nearness),
            nearness,
            redraws,
        })
        .collect();
    let close = nearness.iter().filter(|n| n.too_close).count();
    if close > 0 {
        metrics::counter!("weightgen_samples_too_close_total").increment(close as u64);
    }
    (flat, Some(nearness))
}

/// One condition of all rows of `parts`, in order.
fn concat(parts: &[TaskBatch]) -> TaskBatch {
    let cat = |pick: fn(&TaskBatch) -> Option<&Tensor>| -> Option<Tensor> {
        let tensors: Option<Vec<&Tensor>> = parts.iter().map(pick).collect();
        tensors.map(|t| Tensor::cat(&t, 0))
    };
    TaskBatch {
        features: cat(|b| b.features.as_ref()),
        support_x: cat(|b| b.support_x.as_ref()),
        support_y: cat(|b| b.support_y.as_ref()),
        features_dropped: None,
        support_dropped: None,
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
        zoo_spread: checkpoint
            .zoo_reference
            .as_ref()
            .map(|r| (r.spread, r.len() as usize)),
        support_labels: {
            let encoder = &config.encoder;
            let classification = checkpoint
                .feature_schema
                .support
                .as_ref()
                .is_some_and(|s| s.classification);
            (encoder.support_x_dim > 0 && classification).then_some(encoder.support_y_dim as usize)
        },
    }
}

/// The condition of `job` for `rows` samples, standardized as in training.
fn condition(
    checkpoint: &DenoiserCheckpoint,
    job: &GenerateJob,
    rows: i64,
) -> Result<TaskBatch, FeatureError> {
    let device = checkpoint.model.device();
    let support = job
        .descriptor
        .support_tensors(&checkpoint.feature_schema, job.ways)?;
    let repeat = |t: Tensor| {
        let mut shape = vec![rows];
        shape.extend(std::iter::repeat_n(1, t.dim()));
        t.unsqueeze(0).repeat(shape.as_slice()).to_device(device)
    };
    // No features: a support-only request (the encoder adds nothing for
    // them, as in the harness's support-only row).
    let features = (!job.features.is_empty()).then(|| {
        let features = Tensor::from_slice(&job.features).view([1, -1]);
        let features = match &checkpoint.feature_norm {
            Some(norm) => crate::train::standardize_features(&features, norm),
            None => features,
        };
        repeat(features.squeeze_dim(0))
    });
    Ok(TaskBatch {
        features,
        support_x: support.as_ref().map(|(x, _)| repeat(x.shallow_clone())),
        support_y: support.as_ref().map(|(_, y)| repeat(y.shallow_clone())),
        features_dropped: None,
        support_dropped: None,
    })
}

/// Each row of `flat` [n, D] as a safetensors file of `dtype` tensors.
fn encode(
    checkpoint: &DenoiserCheckpoint,
    flat: &Tensor,
    dtype: DType,
) -> Result<Vec<Bytes>, ModelError> {
    let rows = flat.size()[0];
    let mut files = Vec::with_capacity(rows as usize);
    for i in 0..rows {
        let tensors = unflatten(&checkpoint.arch, &flat.get(i))
            .map_err(|e| ModelError::Checkpoint(e.to_string()))?
            .into_iter()
            .map(|(name, t)| (name, t.to_kind(dtype.kind()).contiguous()))
            .collect::<Vec<_>>();
        let bytes = encode_tensors(&tensors, &HashMap::new())
            .map_err(|e| ModelError::Checkpoint(e.to_string()))?;
        files.push(Bytes::from(bytes));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pending(
        id: &str,
        samples: u64,
    ) -> (Pending, oneshot::Receiver<Result<Generated, ModelError>>) {
        let (reply, rx) = oneshot::channel();
        let job = GenerateJob {
            descriptor: Descriptor {
                features: Default::default(),
                support_x: Vec::new(),
                support_y: Vec::new(),
            },
            features: Vec::new(),
            ways: 1,
            seeds: (0..samples).collect(),
            sampler: SamplerKind::ddim(50, 0.0),
            guidance: 1.0,
            dtype: DType::F32,
            max_redraws: 0,
        };
        let p = Pending {
            id: id.into(),
            job,
            reply,
            enqueued: Instant::now(),
        };
        (p, rx)
    }

    fn config(max_wait_ms: u64) -> BatchConfig {
        BatchConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(max_wait_ms),
            max_queue: 64,
        }
    }

    #[test]
    fn a_batch_waits_only_for_as_many_samples_as_the_previous_one() {
        let (tx, rx) = mpsc::channel();
        let mut backlog = VecDeque::new();
        let mut replies = Vec::new();
        // A lone client (previous batch: 1 sample) is not held back, even
        // with a long max_wait.
        let (first, r) = pending("a", 1);
        replies.push(r);
        let started = Instant::now();
        let batch = fill_batch(first, &rx, &mut backlog, config(10_000), 1);
        assert_eq!(batch.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
        // Requests already waiting join even when the previous batch held
        // one sample.
        let (tx_now, rx_now) = mpsc::channel();
        for _ in 0..3 {
            let (p, r) = pending("a", 1);
            replies.push(r);
            tx_now.send(Message::Generate(Box::new(p))).unwrap();
        }
        let (first, r) = pending("a", 1);
        replies.push(r);
        let batch = fill_batch(first, &rx_now, &mut backlog, config(10_000), 1);
        assert_eq!(batch.len(), 4);
        // Expecting 3 samples: two arrive later and join; the batch starts
        // as soon as it has them.
        let (first, r) = pending("a", 1);
        replies.push(r);
        let sender = std::thread::spawn(move || {
            let mut rs = Vec::new();
            for _ in 0..2 {
                std::thread::sleep(Duration::from_millis(20));
                let (p, r) = pending("a", 1);
                rs.push(r);
                tx.send(Message::Generate(Box::new(p))).unwrap();
            }
            (tx, rs)
        });
        let started = Instant::now();
        let batch = fill_batch(first, &rx, &mut backlog, config(10_000), 3);
        assert_eq!(batch.len(), 3);
        assert!(started.elapsed() < Duration::from_secs(5));
        let (tx, _rs) = sender.join().unwrap();
        // Incompatible requests go to the backlog; max_batch caps the rows;
        // max_wait ends the wait when fewer come than expected.
        let (other, _r1) = pending("b", 1);
        let (big, _r2) = pending("a", 6);
        let (too_big, _r3) = pending("a", 3);
        for p in [other, big, too_big] {
            tx.send(Message::Generate(Box::new(p))).unwrap();
        }
        let (first, _r4) = pending("a", 1);
        let started = Instant::now();
        let batch = fill_batch(first, &rx, &mut backlog, config(50), 8);
        let rows: usize = batch.iter().map(|p| p.job.seeds.len()).sum();
        assert_eq!(rows, 7);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(backlog.len(), 2);
    }

    /// A small untrained digits-free checkpoint: what the guard does does
    /// not depend on how good the samples are.
    fn tiny_checkpoint() -> DenoiserCheckpoint {
        use crate::model::{ConditionalDenoiser, DenoiserConfig, TaskEncoderConfig};
        use crate::weights::{DEFAULT_STD_FLOOR, Stats, StatsMode};
        let arch = ArchSpec::sequential_mlp("mlp-4-3-2", "test", &[4, 3, 2]).unwrap();
        let d = arch.num_parameters() as i64;
        tch::manual_seed(7);
        let zoo = Tensor::randn([30, d], (tch::Kind::Float, Device::Cpu));
        let encoder = TaskEncoderConfig {
            feature_dim: 2,
            support_x_dim: 0,
            support_y_dim: 0,
            hidden: 8,
            embed_dim: 4,
            prototypes: false,
        };
        DenoiserCheckpoint {
            model: ConditionalDenoiser::new(DenoiserConfig::new(d, encoder), Device::Cpu).unwrap(),
            stats: Stats::fit(&zoo, StatsMode::PerDimension, &arch, DEFAULT_STD_FLOOR),
            arch,
            latent: None,
            clip: None,
            feature_schema: FeatureSchema::default(),
            feature_norm: None,
            summary: Default::default(),
            zoo_reference: None,
        }
    }

    #[test]
    fn a_sample_out_of_finite_arithmetic_fails_its_own_request_only() {
        let loaded = HashMap::from([("a".to_owned(), tiny_checkpoint())]);
        let (mut wild, wild_reply) = pending("a", 1);
        wild.job.features = vec![f32::MAX, -f32::MAX];
        let (mut fine, fine_reply) = pending("a", 2);
        fine.job.features = vec![0.5, -0.5];
        fine.job.seeds = vec![5, 6];
        run_batch(&loaded, vec![wild, fine]);
        let wild = wild_reply.blocking_recv().unwrap();
        assert!(matches!(wild, Err(ModelError::NonFinite)), "{wild:?}");
        let fine = fine_reply.blocking_recv().unwrap().unwrap();
        assert_eq!((fine.files.len(), fine.batch_size), (2, 3));
    }

    #[test]
    fn the_guard_redraws_near_copies_within_each_samples_budget() {
        use crate::weights::ZooReference;
        use crate::weights::novelty::{DEFAULT_SPREAD_QUANTILE, MAX_REFERENCE_BYTES};
        let mut checkpoint = tiny_checkpoint();
        let condition = TaskBatch::features(Tensor::zeros([3, 2], (tch::Kind::Float, Device::Cpu)));
        let seeds = [11u64, 12, 13];
        let sampler = SamplerKind::ddim(10, 0.0);
        let first = checkpoint.generate(&condition, &seeds, sampler, 1.0);
        // Without a zoo reference nothing is scored or redrawn.
        let (same, none) = redraw_near_copies(
            &checkpoint,
            first.copy(),
            &condition,
            &seeds,
            &[8; 3],
            sampler,
            1.0,
        );
        assert!(none.is_none() && same.equal(&first));
        // The reference holds a zoo and, among it, the first draw of sample 0:
        // that sample is a copy of a zoo model.
        let zoo = checkpoint.stats.denormalize(&Tensor::randn(
            [30, first.size()[1]],
            (tch::Kind::Float, Device::Cpu),
        ));
        let reference = Tensor::cat(&[zoo.to_kind(tch::Kind::Float), first.narrow(0, 0, 1)], 0);
        checkpoint.zoo_reference =
            ZooReference::fit(&reference, MAX_REFERENCE_BYTES, DEFAULT_SPREAD_QUANTILE);
        let spread = checkpoint.zoo_reference.as_ref().unwrap().spread;
        let scores = checkpoint.zoo_reference.as_ref().unwrap().nearest(&first);
        assert!(spread.too_close(&scores[0]), "{scores:?} {spread:?}");
        assert!(!spread.too_close(&scores[1]) && !spread.too_close(&scores[2]));

        // Budget 0 (the default): the copy is reported, not redrawn.
        let (kept, nearness) = redraw_near_copies(
            &checkpoint,
            first.copy(),
            &condition,
            &seeds,
            &[0; 3],
            sampler,
            1.0,
        );
        let nearness = nearness.unwrap();
        assert!(kept.equal(&first));
        assert!(nearness[0].too_close && nearness[0].redraws == 0);
        assert!((nearness[0].nearness.cosine - 1.0).abs() < 1e-4);

        // With a budget, sample 0 is redrawn once from its redraw seed; the
        // others are untouched.
        let (guarded_flat, nearness) = redraw_near_copies(
            &checkpoint,
            first.copy(),
            &condition,
            &seeds,
            &[2; 3],
            sampler,
            1.0,
        );
        let nearness = nearness.unwrap();
        assert_eq!(
            nearness
                .iter()
                .map(|n| (n.redraws, n.too_close))
                .collect::<Vec<_>>(),
            vec![(1, false), (0, false), (0, false)]
        );
        let redrawn = checkpoint.generate(
            &TaskBatch::features(Tensor::zeros([1, 2], (tch::Kind::Float, Device::Cpu))),
            &[redraw_seed(11, 1)],
            sampler,
            1.0,
        );
        assert!(
            guarded_flat
                .narrow(0, 0, 1)
                .allclose(&redrawn, 1e-6, 1e-6, false)
        );
        assert!(guarded_flat.narrow(0, 1, 2).equal(&first.narrow(0, 1, 2)));
        assert_ne!(redraw_seed(11, 1), redraw_seed(11, 2));
    }

    #[test]
    fn support_only_requests_batch_only_with_each_other() {
        let (mut with_features, _r1) = pending("a", 1);
        let (mut also_with, _r2) = pending("a", 1);
        let (mut support_only, _r3) = pending("a", 1);
        let (mut also_support_only, _r4) = pending("a", 1);
        with_features.job.features = vec![0.5, 1.0];
        also_with.job.features = vec![0.25, 2.0];
        support_only.job.features.clear();
        also_support_only.job.features.clear();
        assert!(with_features.joins(&also_with));
        assert!(support_only.joins(&also_support_only));
        // Another class count never shares a batch (its one-hots are wider).
        let (mut other_ways, _r5) = pending("a", 1);
        other_ways.job.features = vec![0.5, 1.0];
        other_ways.job.ways = 6;
        assert!(!with_features.joins(&other_ways));
        assert!(!with_features.joins(&support_only));
        assert!(!support_only.joins(&with_features));
    }
}
