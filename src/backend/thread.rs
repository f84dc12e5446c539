//! The model thread and its handle: loads and unloads checkpoints and runs
//! batches ([`super::batcher`], [`super::generation`]) in the order
//! messages arrive. The thread stops when the last handle is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use bytes::Bytes;
use tch::Device;
use tokio::sync::oneshot;

use super::batcher::{BatchConfig, Message, Pending, fill_batch};
use super::generation::{guarded, run_batch};
use super::{CheckpointFacts, GenerateJob, Generated, ModelError};
use crate::model::DenoiserCheckpoint;

/// Handle to the model thread; clones share it. The thread stops when the
/// last handle is dropped.
#[derive(Debug, Clone)]
pub struct ModelThread {
    tx: mpsc::Sender<Message>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
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
        latent_dim: checkpoint.latent.as_ref().map_or(0, |l| l.dim() as usize),
        recommended: checkpoint.recommended,
        latent_space: checkpoint
            .latent
            .as_ref()
            .map_or("", |l| l.space())
            .to_owned(),
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
