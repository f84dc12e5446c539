//! Denoisers ε_θ(w_t, t, e) and the task encoder that produces e, built on
//! tch `nn` modules named through `VarStore` paths so checkpoints are
//! readable. Configs are serde structs saved with the weights.

pub mod adam;
mod batch_parts;
pub mod blocks;
pub mod checkpoint;
pub mod conditional;
pub mod film_block;
pub mod fit;
pub mod latent;
pub mod layer_transformer;
pub mod mlp_unet;
pub mod precision;
pub mod task_encoder;
pub mod tokens;
mod variables;
pub mod weight_autoencoder;

pub use blocks::Conditioning;
pub use checkpoint::{CheckpointError, DenoiserCheckpoint, UnionMembership, standardize_features};
pub use conditional::{ConditionalDenoiser, DenoiserConfig, Embedded, NetConfig, PreEmbedded};
pub use fit::{FitConfig, FitReport, LrSchedule, Trainer, TrainerPosition, fit};
pub use latent::Latent;
pub use layer_transformer::{LayerTransformerConfig, TokenLayout};
pub use mlp_unet::MlpUnetConfig;
pub use precision::{LossScale, Precision, PrecisionChoice};
pub use task_encoder::{TaskBatch, TaskEncoderConfig};
pub use weight_autoencoder::{AutoencoderConfig, AutoencoderFit, WeightAutoencoder};
