//! Library types as their `weightgen.v1` messages (job specs: [`jobs`]).

pub mod jobs;

use tonic::Status;

use super::generate_init::sampling_defaults;
use crate::catalog::DenoiserRecord;
use crate::diffusion::RecommendedSampling;
use crate::proto::v1 as pb;
use crate::tasks::featurizer::{Descriptor, MAX_SUPPORT};
use crate::tasks::schema::FeatureSchema;
use crate::weights::{ArchSpec, DType};

/// The wire form of a dtype.
pub fn dtype_to_proto(dtype: DType) -> pb::DType {
    match dtype {
        DType::F32 => pb::DType::DtypeF32,
        DType::F16 => pb::DType::DtypeF16,
        DType::BF16 => pb::DType::DtypeBf16,
    }
}

/// The tensors of `arch`, each reported in `dtype`, with its layer.
pub fn tensor_specs(arch: &ArchSpec, dtype: DType) -> Vec<pb::TensorSpec> {
    arch.tensors
        .iter()
        .map(|t| pb::TensorSpec {
            name: t.name.clone(),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            dtype: dtype_to_proto(dtype) as i32,
            layer: arch
                .layers
                .iter()
                .find(|l| l.tensors.contains(&t.name))
                .map(|l| l.name.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// The wire form of an architecture.
pub fn arch_to_proto(arch: &ArchSpec) -> pb::ArchitectureSpec {
    let tensors = arch
        .tensors
        .iter()
        .zip(tensor_specs(arch, DType::F32))
        .map(|(t, mut spec)| {
            spec.dtype = dtype_to_proto(t.dtype) as i32;
            spec
        })
        .collect();
    pb::ArchitectureSpec {
        name: arch.name.clone(),
        family: arch.family.clone(),
        tensors,
        layers: arch
            .layers
            .iter()
            .map(|l| pb::LayerGroup {
                name: l.name.clone(),
                kind: l.kind.clone(),
                tensors: l.tensors.clone(),
            })
            .collect(),
        num_parameters: arch.num_parameters() as u64,
        base_model: None,
    }
}

/// The wire form of a feature schema.
pub fn schema_to_proto(schema: &FeatureSchema) -> pb::FeatureSchema {
    pb::FeatureSchema {
        features: schema
            .features
            .iter()
            .map(|f| pb::FeatureSpec {
                name: f.name.clone(),
                description: f.description.clone(),
                length: f.length as u32,
                min: f.min,
                max: f.max,
                required: f.required,
            })
            .collect(),
        embedding_dim: schema.embedding_dim as u32,
        support: schema.support.as_ref().map(|s| pb::SupportSpec {
            input_shape: s.input_shape.iter().map(|&d| d as u64).collect(),
            target_shape: s.target_shape.iter().map(|&d| d as u64).collect(),
            classification: s.classification,
            min_examples: s.min_examples as u32,
            max_examples: s.max_examples as u32,
            required: s.required,
            byte_tokens: s.inputs == crate::tasks::schema::SupportInputs::ByteTokens,
        }),
    }
}

/// A unix-ms time as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// What the catalog row of a denoiser says about it (the feature schema
/// comes with its checkpoint: see `serve::generation::denoiser_info`).
pub fn denoiser_record_to_proto(record: &DenoiserRecord, version: u32) -> pb::DenoiserInfo {
    let config = &record.config["denoiser"];
    let timesteps = config["timesteps"].as_u64().unwrap_or(0) as u32;
    // The sampling its training gate chose (rows written before there was
    // one: the server's defaults, as serving uses for them).
    let recommended: Option<RecommendedSampling> =
        serde_json::from_value(record.config["recommended_sampling"].clone()).unwrap_or(None);
    let (default_sampler, default_steps, default_guidance) =
        sampling_defaults(recommended, timesteps as usize);
    pb::DenoiserInfo {
        id: record.id.clone(),
        version,
        architecture: record.architecture.clone(),
        active: record.active,
        feature_schema: None,
        timesteps,
        // `ScheduleKind` serializes as {"kind": "cosine", ...}.
        schedule: config["schedule"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        // The layer transformer on unit tokens is the kind users train as
        // `unit_transformer`.
        kind: match config["net"]["tokens"].as_str() {
            Some("units") => "unit_transformer",
            _ => config["net"]["kind"].as_str().unwrap_or("mlp_unet"),
        }
        .to_owned(),
        latent_dim: 0,
        latent_space: String::new(),
        default_sampler: default_sampler as i32,
        default_steps: default_steps as u32,
        default_guidance: default_guidance as f32,
        metrics: record
            .summary
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        zoo_models: record.summary.get("zoo_models").copied().unwrap_or(0.0) as u64,
        config_json: record.config.to_string(),
        sha256: record.sha256.clone(),
        size_bytes: record.size_bytes,
        created_at: Some(timestamp(record.created_at_ms)),
    }
}

/// A request's task as the featurizer's `Descriptor`: features by name and
/// the support set as rows. Errors name the field under `prefix` (e.g.
/// "task" or "header.task").
pub fn descriptor_from_proto(
    task: &pb::TaskDescriptor,
    prefix: &str,
) -> Result<Descriptor, Status> {
    // Feature names are quoted in later errors: refuse long ones unquoted.
    for name in task.features.keys() {
        super::status::bounded_name(&format!("{prefix}.features"), name)?;
    }
    let invalid = |field: &str, reason: String| {
        Status::invalid_argument(format!("{prefix}.support.{field}: {reason}"))
    };
    let rows = |t: &Option<pb::FloatTensor>, field: &str| -> Result<Vec<Vec<f32>>, Status> {
        let Some(t) = t else {
            return Err(invalid(field, "required with a support set".into()));
        };
        let k = *t
            .shape
            .first()
            .ok_or_else(|| invalid(field, "shape is empty".into()))? as usize;
        // Checked product: a shape like [2^32, 2^32] must not wrap around to
        // the number of values sent.
        let count = t
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| invalid(field, format!("shape {:?} is too large", t.shape)))?;
        if count != t.values.len() as u64 {
            return Err(invalid(
                field,
                format!(
                    "shape {:?} needs {count} values, got {}",
                    t.shape,
                    t.values.len()
                ),
            ));
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        if k > MAX_SUPPORT {
            return Err(invalid(
                field,
                format!("{k} examples; at most {MAX_SUPPORT} are accepted"),
            ));
        }
        let width = t.values.len() / k;
        if width == 0 {
            // Rows of no values (a `words` support set has no targets).
            return Ok(vec![Vec::new(); k]);
        }
        Ok(t.values.chunks(width.max(1)).map(<[f32]>::to_vec).collect())
    };
    let (support_x, support_y) = match &task.support {
        None => (Vec::new(), Vec::new()),
        Some(set) => (rows(&set.inputs, "inputs")?, rows(&set.targets, "targets")?),
    };
    Ok(Descriptor {
        features: task
            .features
            .iter()
            .map(|(k, v)| (k.clone(), v.values.clone()))
            .collect(),
        support_x,
        support_y,
    })
}

/// The API's view of an adapter's base model.
pub fn base_model_to_proto(base: &crate::serve::denoisers::BaseModel) -> pb::BaseModel {
    pb::BaseModel {
        architecture: base.architecture.clone(),
        zoo_model_id: base.zoo_model_id.clone(),
        sha256: base.sha256.clone(),
    }
}

/// The architecture a loaded denoiser generates, with its base model.
pub fn served_arch_to_proto(
    loaded: &crate::serve::denoisers::LoadedDenoiser,
) -> pb::ArchitectureSpec {
    pb::ArchitectureSpec {
        base_model: loaded.base_model.as_ref().map(base_model_to_proto),
        ..arch_to_proto(&loaded.facts.arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::generate_init::DEFAULT_DDIM_STEPS;

    fn record(config: serde_json::Value) -> DenoiserRecord {
        DenoiserRecord {
            id: "d".into(),
            architecture: "a".into(),
            sha256: "0".repeat(64),
            size_bytes: 1,
            config,
            summary: Default::default(),
            active: true,
            created_at_ms: 0,
        }
    }

    #[test]
    fn support_rows_of_no_values_keep_their_count_and_huge_counts_are_refused() {
        let task = |k: u64| pb::TaskDescriptor {
            support: Some(pb::SupportSet {
                inputs: Some(pb::FloatTensor {
                    shape: vec![k, 1],
                    values: vec![97.0; k.min(4) as usize],
                }),
                targets: Some(pb::FloatTensor {
                    shape: vec![k, 0],
                    values: Vec::new(),
                }),
            }),
            ..Default::default()
        };
        let d = descriptor_from_proto(&task(3), "task").unwrap();
        assert_eq!((d.support_x.len(), d.support_y.len()), (3, 3));
        assert!(d.support_y.iter().all(Vec::is_empty));
        let huge = descriptor_from_proto(&task(1 << 40), "task").unwrap_err();
        assert_eq!(huge.code(), tonic::Code::InvalidArgument);
        assert!(
            huge.message().starts_with("task.support."),
            "{}",
            huge.message()
        );
    }

    #[test]
    fn a_row_reports_the_sampling_its_gate_chose_or_the_servers_default() {
        let chosen = serde_json::json!({
            "denoiser": {"timesteps": 1000},
            "recommended_sampling": {"sampler": "dpm_solver", "steps": 1, "guidance": 1.0}
        });
        let info = denoiser_record_to_proto(&record(chosen), 1);
        assert_eq!(
            (
                info.default_sampler(),
                info.default_steps,
                info.default_guidance
            ),
            (pb::Sampler::DpmSolver, 1, 1.0)
        );
        for older in [
            serde_json::json!({"denoiser": {"timesteps": 1000}}),
            serde_json::json!({"denoiser": {"timesteps": 1000}, "recommended_sampling": null}),
        ] {
            let info = denoiser_record_to_proto(&record(older), 1);
            assert_eq!(
                (
                    info.default_sampler(),
                    info.default_steps,
                    info.default_guidance
                ),
                (pb::Sampler::Ddim, DEFAULT_DDIM_STEPS as u32, 1.0)
            );
        }
    }
}
