//! Batching: the first waiting request, the compatible ones behind it (same
//! denoiser, sampler, guidance and support-set size) and those arriving
//! while the batch is smaller than the previous one (for at most
//! `max_wait`) share one reverse diffusion of up to `max_batch` samples. A
//! lone client is served at once (its previous batch held one sample);
//! under steady concurrent load the batch waits for the clients that are
//! still receiving the previous answers instead of running half empty. Each
//! sample's noise comes from its own seed, so a request's bytes do not
//! depend on what it was batched with.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{CheckpointFacts, GenerateJob, Generated, ModelError};

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

pub(super) enum Message {
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

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Load { id, .. } => write!(f, "Load({id})"),
            Self::Unload { id } => write!(f, "Unload({id})"),
            Self::Generate(p) => write!(f, "Generate({})", p.id),
        }
    }
}

/// A generation waiting for its batch.
pub(super) struct Pending {
    pub(super) id: String,
    pub(super) job: GenerateJob,
    pub(super) reply: oneshot::Sender<Result<Generated, ModelError>>,
    pub(super) enqueued: Instant,
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

/// `first` and the compatible requests already waiting, then those arriving
/// until the batch holds `expected_rows` samples (the previous batch's) or
/// `max_wait` has passed, up to `max_batch` samples. Others go to the
/// backlog.
pub(super) fn fill_batch(
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::diffusion::SamplerKind;
    use crate::tasks::featurizer::Descriptor;
    use crate::weights::DType;
    use std::time::Duration;

    pub(in crate::backend) fn pending(
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
