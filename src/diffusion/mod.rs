//! The diffusion process over (standardized) weight vectors, as in the
//! proposal: noise schedules, the closed-form forward process q(w_t | w_0),
//! training targets and loss, and the DDPM and DDIM reverse samplers with
//! classifier-free guidance. Knows nothing of gRPC or storage.

pub mod objective;
pub mod oracle;
pub mod recommended;
pub mod sampler;
pub mod schedule;
mod step;
pub mod trajectory;

/// The seeded noise lives below everything ([`crate::rng`]); re-exported
/// here because sampling is its main user.
pub use crate::rng::SeededNoise;
pub use objective::Prediction;
pub use recommended::{RecommendedSampler, RecommendedSampling};
pub use sampler::{
    ClipRange, DdimSpacing, Denoiser, SamplerKind, SamplingConfig, guide, is_guided, sample,
};
pub use schedule::{NoiseSchedule, ScheduleError, ScheduleKind};
pub use trajectory::Trajectory;
