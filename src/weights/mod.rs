//! Weight space: architectures as ordered named tensors (`ArchSpec`),
//! flattening checkpoints to w ∈ R^D and back, per-dimension standardization
//! over a zoo (`Stats`), permutation alignment, and safetensors encoding.
//! Knows nothing about diffusion or storage.

pub mod align;
pub mod arch;
pub mod codec;
pub mod flat;
pub mod latent;
pub mod neurons;
pub mod novelty;
pub mod stats;
pub mod union;

pub use align::{AlignError, AlignReport, PermutationSpec, align};
pub use arch::{ArchSpec, DType, LayerGroup, LayoutError, TensorSpec};
pub use codec::{
    CodecError, Decoded, TORCH_FORMAT, decode_safetensors, decode_tensors, encode_safetensors,
    encode_tensors,
};
pub use flat::{NamedTensors, flatten, flatten_batch, unflatten};
pub use latent::{LatentSizeReport, MetricGoal, PcaLatent, choose_latent_size};
pub use neurons::{NeuronGroup, NeuronLayout, pool_over_units};
pub use novelty::{Nearness, ZooReference, ZooSpread};
pub use stats::{DEFAULT_STD_FLOOR, Stats, StatsMode};
pub use union::{ArchUnion, Placement, UnionError};
