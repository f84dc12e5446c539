//! The tensor side of serving: one thread owns every loaded denoiser and
//! runs all tch work of the server — loading checkpoints, reverse
//! diffusion, encoding samples as safetensors. The async side (`serve`)
//! talks to it through [`ModelThread`], a handle that sends messages and
//! gets plain bytes back, so no tensor ever crosses an `.await`.
//!
//! - [`thread`]: the handle and the loop that owns the checkpoints;
//! - [`batcher`]: which waiting requests share one reverse diffusion;
//! - [`generation`]: one batch — conditions, sampling, the memorization
//!   guard's redraws, encoding — and each request's share of it.

use bytes::Bytes;

use crate::diffusion::{RecommendedSampling, SamplerKind};
use crate::tasks::featurizer::{Descriptor, FeatureError};
use crate::tasks::schema::FeatureSchema;
use crate::weights::{ArchSpec, DType, Nearness, ZooSpread};

pub mod batcher;
pub mod generation;
pub mod thread;

pub use batcher::{BatchConfig, DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT};
pub use generation::redraw_seed;
pub use thread::ModelThread;

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
