//! The model thread and its handle. The thread owns the [`Engine`]: while
//! requests are in flight it takes whatever messages have arrived (loads,
//! unloads, new requests), then runs one denoiser pass, and again; idle, it
//! blocks on the next message. It stops when the last handle is dropped
//! and nothing is left in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tch::Device;
use tokio::sync::{mpsc as async_mpsc, oneshot};

use super::batcher::{BatchConfig, window_samples};
use super::engine::{Engine, Pending};
use super::trace::RequestTrace;
use super::{CheckpointFacts, GenerateJob, GenerationSummary, ModelError, SampleOut};
use crate::model::DenoiserCheckpoint;
use crate::weights::ArchSpec;

enum Message {
    Load {
        id: String,
        bytes: Bytes,
        architecture: Option<ArchSpec>,
        reply: oneshot::Sender<Result<CheckpointFacts, ModelError>>,
    },
    Unload {
        id: String,
    },
    Generate(Box<Pending>),
}

/// Handle to the model thread; clones share it. The thread stops when the
/// last handle is dropped.
#[derive(Debug, Clone)]
pub struct ModelThread {
    tx: mpsc::Sender<Message>,
    queued: Arc<AtomicUsize>,
    batching: BatchConfig,
}

impl ModelThread {
    /// Starts the thread; models live on `device`.
    pub fn spawn(device: Device, batching: BatchConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let counter = queued.clone();
        std::thread::Builder::new()
            .name("weightgen-model".into())
            .spawn(move || serve(rx, Engine::new(device, batching, counter)))?;
        Ok(Self {
            tx,
            queued,
            batching,
        })
    }

    /// Requests waiting or in flight.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Loads (parses, places on the device) a checkpoint under `id`, for
    /// `architecture` when the checkpoint generates several.
    pub async fn load(
        &self,
        id: &str,
        bytes: Bytes,
        architecture: Option<ArchSpec>,
    ) -> Result<CheckpointFacts, ModelError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Load {
                id: id.to_owned(),
                bytes,
                architecture,
                reply,
            })
            .map_err(|_| ModelError::Stopped)?;
        answer.await.map_err(|_| ModelError::Stopped)?
    }

    /// Frees a loaded checkpoint (after the messages already sent).
    pub fn unload(&self, id: &str) {
        let _ = self.tx.send(Message::Unload { id: id.to_owned() });
    }

    /// Queues `job` on denoiser `id`, whose sample files are `file_bytes`
    /// long: its samples join the running batch as room allows and come
    /// out of the returned stream as they finish. A full queue answers
    /// `QueueFull` at once; dropping the stream (a client that went away)
    /// takes the request out of the batch at the next pass.
    pub fn generate(
        &self,
        id: &str,
        job: GenerateJob,
        file_bytes: usize,
    ) -> Result<SampleStream, ModelError> {
        let waiting = self.queued.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.batching.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("weightgen_generate_rejected_total", "reason" => "queue_full")
                .increment(1);
            return Err(ModelError::QueueFull(self.batching.max_queue));
        }
        let window = window_samples(self.batching.stream_window, file_bytes, job.seeds.len());
        let (samples, samples_rx) = async_mpsc::channel(window);
        let (done, done_rx) = oneshot::channel();
        let trace = RequestTrace::arrive(id, job.seeds.len());
        let sent = self.tx.send(Message::Generate(Box::new(Pending {
            id: id.to_owned(),
            job,
            trace,
            samples,
            done,
            enqueued: Instant::now(),
        })));
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(ModelError::Stopped);
        }
        Ok(SampleStream {
            samples: samples_rx,
            done: Some(done_rx),
        })
    }
}

/// What a [`SampleStream`] yields.
#[derive(Debug)]
pub enum StreamEvent {
    /// The next sample, in request order.
    Sample(SampleOut),
    /// Every sample is out.
    Done(GenerationSummary),
}

/// The samples of one request as they finish, then how it went.
#[derive(Debug)]
pub struct SampleStream {
    samples: async_mpsc::Receiver<SampleOut>,
    done: Option<oneshot::Receiver<Result<GenerationSummary, ModelError>>>,
}

impl SampleStream {
    /// The next sample, or `Done` after the last; an error ends the
    /// request (samples already yielded stay valid). Not to be called
    /// again after `Done` or an error.
    pub async fn next(&mut self) -> Result<StreamEvent, ModelError> {
        if let Some(sample) = self.samples.recv().await {
            return Ok(StreamEvent::Sample(sample));
        }
        let done = self.done.take().ok_or(ModelError::Stopped)?;
        match done.await {
            Ok(result) => result.map(StreamEvent::Done),
            Err(_) => Err(ModelError::Stopped),
        }
    }
}

/// How long the thread waits for a message when every request in flight
/// waits for its client to take samples (instead of spinning).
const CLIENT_WAIT: Duration = Duration::from_millis(2);

fn serve(rx: mpsc::Receiver<Message>, mut engine: Engine) {
    let mut ran = true;
    loop {
        if engine.idle() {
            // No handle left and nothing in flight: done.
            let Ok(message) = rx.recv() else { return };
            handle(&mut engine, message);
        } else if !ran {
            // Every request waits for its client: wait a little for a message.
            match rx.recv_timeout(CLIENT_WAIT) {
                Ok(message) => handle(&mut engine, message),
                // Shutting down with clients still reading: no message will
                // come, so wait for them here.
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(CLIENT_WAIT),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        while let Ok(message) = rx.try_recv() {
            handle(&mut engine, message);
        }
        ran = engine.step();
    }
}

fn handle(engine: &mut Engine, message: Message) {
    match message {
        Message::Load {
            id,
            bytes,
            architecture,
            reply,
        } => {
            let _ = reply.send(engine.load(id, &bytes, architecture.as_ref()).map(facts));
        }
        Message::Unload { id } => engine.unload(&id),
        Message::Generate(pending) => engine.add(*pending),
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
        // A denoiser of several architectures diffuses their union.
        latent_dim: match (&checkpoint.latent, &checkpoint.union) {
            (Some(latent), _) => latent.dim() as usize,
            (None, Some(membership)) => membership.union.dim(),
            (None, None) => 0,
        },
        recommended: checkpoint.recommended,
        latent_space: match (&checkpoint.latent, &checkpoint.union) {
            (Some(latent), _) => latent.space(),
            (None, Some(_)) => "union",
            (None, None) => "",
        }
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
