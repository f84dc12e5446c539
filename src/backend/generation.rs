//! What the engine ([`super::engine`]) does with one request or sample:
//! its condition, the redraw seeds of the memorization guard, encoding a
//! sample as safetensors, and keeping libtorch's panics to the request
//! that caused them.

use std::collections::HashMap;

use bytes::Bytes;
use tch::Tensor;

use super::{GenerateJob, ModelError};
use crate::model::{DenoiserCheckpoint, TaskBatch};
use crate::rng::splitmix64;
use crate::tasks::featurizer::FeatureError;
use crate::weights::{DType, encode_tensors, unflatten};

/// Whether every value of `weights` is finite.
pub(super) fn finite(weights: &Tensor) -> bool {
    weights.isfinite().all().int64_value(&[]) != 0
}

/// The seed of redraw `attempt` (1, 2, …) of the sample seeded `seed`: a
/// function of both, so a guarded request is as reproducible as any.
pub fn redraw_seed(seed: u64, attempt: u32) -> u64 {
    splitmix64(seed ^ splitmix64(0x9E37_79B9_7F4A_7C15 ^ u64::from(attempt)))
}

/// Runs `work`, turning a libtorch panic (tch unwraps its errors) into an
/// error for this request instead of the end of the thread.
pub(super) fn guarded<T>(work: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
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

/// The header metadata of sample `index` of `job`: the request's
/// provenance, the sample's seed and its redraws.
pub(super) fn sample_metadata(
    job: &GenerateJob,
    index: usize,
    redraws: u32,
) -> HashMap<String, String> {
    let mut metadata: HashMap<String, String> = job.metadata.clone().into_iter().collect();
    if let Some(seed) = job.seeds.get(index) {
        metadata.insert(super::SEED_KEY.to_owned(), seed.to_string());
    }
    metadata.insert(super::REDRAWS_KEY.to_owned(), redraws.to_string());
    metadata
}

/// The condition of `job` as one row (the engine embeds each request once),
/// standardized as in training.
pub(super) fn condition(
    checkpoint: &DenoiserCheckpoint,
    job: &GenerateJob,
) -> Result<TaskBatch, FeatureError> {
    let support = job
        .descriptor
        .support_tensors(&checkpoint.feature_schema, job.ways)?;
    let one_row = |t: &Tensor| t.unsqueeze(0);
    // No features: a support-only request.
    let features = (!job.features.is_empty()).then(|| one_row(&Tensor::from_slice(&job.features)));
    Ok(checkpoint.condition(
        features.as_ref(),
        support.map(|(x, y)| (one_row(&x), one_row(&y))),
    ))
}

/// One sample's flat weights [D] as a safetensors file of `dtype` tensors.
pub(super) fn encode_one(
    checkpoint: &DenoiserCheckpoint,
    flat: &Tensor,
    dtype: DType,
    metadata: &HashMap<String, String>,
) -> Result<Bytes, ModelError> {
    let tensors = unflatten(&checkpoint.arch, flat)
        .map_err(|e| ModelError::Checkpoint(e.to_string()))?
        .into_iter()
        .map(|(name, t)| (name, t.to_kind(dtype.kind()).contiguous()))
        .collect::<Vec<_>>();
    let bytes =
        encode_tensors(&tensors, metadata).map_err(|e| ModelError::Checkpoint(e.to_string()))?;
    Ok(Bytes::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::SamplerKind;
    use crate::tasks::featurizer::Descriptor;

    #[test]
    fn each_sample_carries_the_requests_provenance_its_seed_and_redraws() {
        let job = GenerateJob {
            descriptor: Descriptor {
                features: Default::default(),
                support_x: Vec::new(),
                support_y: Vec::new(),
            },
            features: Vec::new(),
            ways: 1,
            seeds: vec![41, 42, 43],
            sampler: SamplerKind::ddim(10, 0.0),
            guidance: 3.0,
            dtype: DType::F32,
            max_redraws: 2,
            deadline: None,
            metadata: [("format".to_owned(), "pt".to_owned())].into(),
        };
        let second = sample_metadata(&job, 1, 2);
        assert_eq!(second["format"], "pt");
        assert_eq!(second[super::super::SEED_KEY], "42");
        assert_eq!(second[super::super::REDRAWS_KEY], "2");
        assert_eq!(sample_metadata(&job, 2, 0)[super::super::SEED_KEY], "43");
    }
}
