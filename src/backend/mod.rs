//! The tensor side of serving: one thread owns every loaded denoiser and
//! runs all tch work of the server — loading checkpoints, reverse
//! diffusion, encoding samples as safetensors. The async side (`serve`)
//! talks to it through [`ModelThread`], a handle that sends messages and
//! gets plain bytes back, so no tensor ever crosses an `.await`.
//!
//! - [`thread`]: the handle and the loop that owns the checkpoints;
//! - [`engine`]: step-level continuous batching — every request in flight
//!   advances by one denoiser step per pass, whatever its sampler, step
//!   count or guidance, and its samples stream out as they finish;
//! - [`batcher`]: the policy — which requests start, which rows share the
//!   next pass;
//! - [`generation`]: conditions, the memorization guard, encoding;
//! - [`cuda_graph`]: on a GPU, each pass recorded once per batch-size
//!   bucket as a CUDA graph and replayed (one launch instead of dozens).

use bytes::Bytes;

use crate::diffusion::{RecommendedSampling, SamplerKind};
use crate::tasks::featurizer::{Descriptor, FeatureError};
use crate::tasks::schema::FeatureSchema;
use crate::weights::{ArchSpec, DType, Nearness, ZooSpread};

pub mod batcher;
pub mod cuda_graph;
pub mod engine;
pub mod generation;
pub mod thread;
mod trace;

pub use batcher::{
    BatchConfig, DEFAULT_MAX_ACTIVE, DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_STREAM_WINDOW,
};
pub use generation::redraw_seed;
pub use thread::{ModelThread, SampleStream, StreamEvent};

/// What a loaded checkpoint is, for the async side (no tensors).
#[derive(Debug, Clone)]
pub struct CheckpointFacts {
    /// Architecture of the generated weights.
    pub arch: ArchSpec,
    /// Conditioning inputs.
    pub schema: FeatureSchema,
    /// Diffusion steps T the denoiser was trained with (the most a sampler may take).
    pub timesteps: usize,
    /// "cosine" / "linear".
    pub schedule: String,
    /// "mlp_unet" / "layer_transformer".
    pub kind: String,
    /// Latent size (0 = the standardized weights).
    pub latent_dim: usize,
    /// The latent's kind, "pca" or "autoencoder" ("" without one).
    pub latent_space: String,
    /// The sampling its training gate chose, for what requests leave unset.
    pub recommended: Option<RecommendedSampling>,
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
    /// DDPM, or DDIM with its steps, η and grid.
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Element type of the returned tensors.
    pub dtype: DType,
    /// Most times a sample too close to a zoo model is redrawn (checked
    /// against `MAX_REDRAWS` and the checkpoint before queueing).
    pub max_redraws: u32,
    /// When the call must be answered: past it the request leaves the
    /// running batch (None: no limit).
    pub deadline: Option<std::time::Instant>,
    /// The request's provenance, written into every sample's safetensors
    /// header (`__metadata__`) together with the sample's own
    /// [`SEED_KEY`] and [`REDRAWS_KEY`].
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// The metadata key of a sample's seed (the request's seed + its index).
pub const SEED_KEY: &str = "weightgen.seed";
/// The metadata key of how often the memorization guard redrew a sample.
pub const REDRAWS_KEY: &str = "weightgen.redraws";

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

/// One finished sample, in request order.
#[derive(Debug)]
pub struct SampleOut {
    /// Its index in the request (seed = first seed + index).
    pub index: usize,
    /// The safetensors file.
    pub file: Bytes,
    /// Its nearness to the zoo, when the checkpoint carries a zoo reference.
    pub nearness: Option<SampleNearness>,
}

/// How a request went, once its last sample is out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationSummary {
    /// Time from arrival until its first samples joined the running batch.
    pub queue_ms: f64,
    /// Time from then until its last sample was encoded.
    pub sampling_ms: f64,
    /// Most samples (of all requests) in one denoiser pass it took part in.
    pub batch_size: usize,
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
    /// A sample came out with NaN or infinite values: never returned.
    #[error(
        "task: the conditioning drove the denoiser out of finite arithmetic (NaN or infinite \
         weights); support values or guidance far outside what the denoiser was trained on"
    )]
    NonFinite,
    /// Too many requests are waiting.
    #[error("the generation queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The request's deadline passed before its last sample was done.
    #[error("deadline exceeded: {done} of {asked} samples were done by the call's deadline")]
    DeadlineExceeded {
        /// Samples delivered.
        done: usize,
        /// Samples asked for.
        asked: usize,
    },
    /// The thread is gone.
    #[error("the model thread has stopped")]
    Stopped,
}

impl ModelError {
    /// The same failure for another request of the pass it broke (libtorch
    /// errors are not `Clone`): its libtorch message kept as it is.
    pub(crate) fn for_another(&self) -> ModelError {
        match self {
            Self::Torch(message) => Self::Torch(message.clone()),
            other => Self::Torch(other.to_string()),
        }
    }
}
