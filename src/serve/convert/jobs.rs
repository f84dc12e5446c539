//! Job specs and their `weightgen.v1` messages: the one place a
//! [`TrainSpec`] or [`ZooSpec`] field meets its proto field. An unset
//! optional field, an `UNSPECIFIED` enum or an empty list takes the spec's
//! default; a spec read back from a job row is shown with every field set.

use crate::diffusion::objective::Prediction;
use crate::jobs::spec::{DenoiserKind, NoiseSchedule, SpecError};
use crate::jobs::{TrainSpec, ZooSpec};
use crate::model::{Conditioning, LrSchedule, Precision, PrecisionChoice};
use crate::proto::v1 as pb;
use crate::train::LatentChoice;
use crate::zoo::AlignChoice;

fn invalid(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: format!("train_denoiser.{field}"),
        reason: reason.into(),
    }
}

/// The value of enum field `field`: `default` when unspecified, `map` of it
/// otherwise, an error naming the field for a number the proto lacks.
fn enum_field<P: TryFrom<i32>, T>(
    field: &str,
    raw: i32,
    default: T,
    map: impl Fn(P) -> Option<T>,
) -> Result<T, SpecError> {
    let value = P::try_from(raw).map_err(|_| invalid(field, format!("unknown value {raw}")))?;
    Ok(map(value).unwrap_or(default))
}

/// A u32 count as the spec's size.
fn count(value: Option<u32>, default: usize) -> usize {
    value.map_or(default, |v| v as usize)
}

/// The spec of a BuildZoo request (not yet validated).
pub fn zoo_spec_from_proto(spec: &pb::BuildZooSpec) -> ZooSpec {
    ZooSpec {
        zoo: Some(spec.zoo.clone()).filter(|z| !z.is_empty()),
        family: spec.family.clone(),
        architecture: spec.architecture.clone(),
        num_models: u64::from(spec.num_models),
        shared_init: spec.shared_init,
        seed: spec.seed,
        steps: spec.steps.map(|s| s as usize),
        learning_rate: spec.learning_rate,
        keep_snapshots: spec.keep_last_checkpoints as usize,
        base_steps: spec.base_steps.map(|s| s as usize),
    }
}

/// A zoo spec as the API shows it.
pub fn zoo_spec_to_proto(spec: &ZooSpec) -> pb::BuildZooSpec {
    pb::BuildZooSpec {
        family: spec.family.clone(),
        architecture: spec.architecture.clone(),
        num_models: spec.num_models.min(u64::from(u32::MAX)) as u32,
        shared_init: spec.shared_init,
        seed: spec.seed,
        keep_last_checkpoints: spec.keep_snapshots.min(u32::MAX as usize) as u32,
        zoo: spec.zoo_name(),
        steps: spec.steps.map(|s| s.min(u32::MAX as usize) as u32),
        learning_rate: spec.learning_rate,
        base_steps: spec.base_steps.map(|s| s.min(u32::MAX as usize) as u32),
    }
}

/// The latent a request's (space, size) pair names.
fn latent_from_proto(space: i32, size: u32) -> Result<LatentChoice, SpecError> {
    let space = enum_field("latent", space, None, |s: pb::LatentSpace| match s {
        pb::LatentSpace::Unspecified => None,
        other => Some(Some(other)),
    })?;
    match (space, size) {
        (None, 0) => Ok(TrainSpec::default().latent),
        (Some(pb::LatentSpace::Pca), 0) => Ok(LatentChoice::PcaAuto),
        (None | Some(pb::LatentSpace::Pca), k) => format!("pca:{k}")
            .parse()
            .map_err(|e: String| invalid("latent_size", e)),
        (Some(pb::LatentSpace::Autoencoder), 0) => Err(invalid(
            "latent_size",
            "LATENT_SPACE_AUTOENCODER needs a latent size",
        )),
        (Some(pb::LatentSpace::Autoencoder), k) => format!("ae:{k}")
            .parse()
            .map_err(|e: String| invalid("latent_size", e)),
        (Some(_), 0) => Ok(LatentChoice::None),
        (Some(_), _) => Err(invalid(
            "latent_size",
            "only with LATENT_SPACE_PCA or LATENT_SPACE_AUTOENCODER",
        )),
    }
}

/// The spec of a TrainDenoiser request (not yet validated).
pub fn train_spec_from_proto(spec: &pb::TrainDenoiserSpec) -> Result<TrainSpec, SpecError> {
    let d = TrainSpec::default();
    Ok(TrainSpec {
        zoo: spec.zoo.clone(),
        denoiser_id: Some(spec.denoiser_id.clone()).filter(|s| !s.is_empty()),
        architecture: Some(spec.architecture.clone()).filter(|s| !s.is_empty()),
        kind: enum_field("kind", spec.kind, d.kind, |k| match k {
            pb::DenoiserKind::Unspecified => None,
            pb::DenoiserKind::MlpUnet => Some(DenoiserKind::MlpUnet),
            pb::DenoiserKind::LayerTransformer => Some(DenoiserKind::LayerTransformer),
            pb::DenoiserKind::UnitTransformer => Some(DenoiserKind::UnitTransformer),
        })?,
        steps: count(spec.steps, d.steps),
        batch_size: spec.batch_size.map_or(d.batch_size, i64::from),
        learning_rate: spec.learning_rate.unwrap_or(d.learning_rate),
        lr_schedule: enum_field(
            "lr_schedule",
            spec.lr_schedule,
            d.lr_schedule,
            |s| match s {
                pb::LrSchedule::Unspecified => None,
                pb::LrSchedule::Constant => Some(LrSchedule::Constant),
                pb::LrSchedule::Cosine => Some(LrSchedule::Cosine),
            },
        )?,
        weight_decay: spec.weight_decay.unwrap_or(d.weight_decay),
        timesteps: count(spec.timesteps, d.timesteps),
        schedule: enum_field("schedule", spec.schedule, d.schedule, |s| match s {
            pb::NoiseSchedule::Unspecified => None,
            pb::NoiseSchedule::Cosine => Some(NoiseSchedule::Cosine),
            pb::NoiseSchedule::Linear => Some(NoiseSchedule::Linear),
        })?,
        prediction: enum_field("prediction", spec.prediction, d.prediction, |p| match p {
            pb::Prediction::Unspecified => None,
            pb::Prediction::Epsilon => Some(Some(Prediction::Epsilon)),
            pb::Prediction::X0 => Some(Some(Prediction::X0)),
            pb::Prediction::V => Some(Some(Prediction::V)),
        })?,
        seed: spec.seed,
        latent: latent_from_proto(spec.latent, spec.latent_size)?,
        latent_steps: count(spec.latent_steps, d.latent_steps),
        widths: if spec.widths.is_empty() {
            d.widths
        } else {
            spec.widths.iter().map(|&w| i64::from(w)).collect()
        },
        blocks_per_level: count(spec.blocks_per_level, d.blocks_per_level),
        conditioning: enum_field(
            "conditioning",
            spec.conditioning,
            d.conditioning,
            |c| match c {
                pb::Conditioning::Unspecified => None,
                pb::Conditioning::Film => Some(Conditioning::Film),
                pb::Conditioning::Concat => Some(Conditioning::Concat),
            },
        )?,
        embed_dim: spec.embed_dim.map_or(d.embed_dim, i64::from),
        encoder_hidden: spec.encoder_hidden.map_or(d.encoder_hidden, i64::from),
        transformer_width: spec
            .transformer_width
            .map_or(d.transformer_width, i64::from),
        transformer_depth: count(spec.transformer_depth, d.transformer_depth),
        transformer_heads: spec
            .transformer_heads
            .map_or(d.transformer_heads, i64::from),
        cond_dropout: spec.cond_dropout.unwrap_or(d.cond_dropout),
        feature_dropout: spec.feature_dropout.unwrap_or(d.feature_dropout),
        support_dropout: spec.support_dropout.unwrap_or(d.support_dropout),
        ema_decay: spec.ema_decay.unwrap_or(d.ema_decay),
        val_fraction: spec.val_fraction.unwrap_or(d.val_fraction),
        align: enum_field("align", spec.align, d.align, |a| match a {
            pb::Alignment::Unspecified => None,
            pb::Alignment::Auto => Some(AlignChoice::Auto),
            pb::Alignment::Always => Some(AlignChoice::Always),
            pb::Alignment::Never => Some(AlignChoice::Never),
        })?,
        max_models: spec.max_models.map(|n| n as usize),
        eval_tasks: count(spec.eval_tasks, d.eval_tasks),
        eval_guidance: spec.eval_guidance.unwrap_or(d.eval_guidance),
        log_every: count(spec.log_every, d.log_every),
        checkpoint_every: count(spec.checkpoint_every, d.checkpoint_every),
        precision: enum_field("precision", spec.precision, d.precision, |p| match p {
            pb::TrainPrecision::Unspecified => None,
            pb::TrainPrecision::Auto => Some(PrecisionChoice::Auto),
            pb::TrainPrecision::Fp32 => Some(PrecisionChoice::Fixed(Precision::Fp32)),
            pb::TrainPrecision::Fp16 => Some(PrecisionChoice::Fixed(Precision::Fp16)),
        })?,
        data_parallel: count(spec.data_parallel, d.data_parallel),
        train_windows: spec.train_windows.map(|n| n as usize),
        also_zoos: spec.also_zoos.clone(),
        activate: spec.activate,
    })
}

/// A u32 field's value (sizes above u32::MAX cannot come from the API).
fn narrow(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// A training spec as the API shows it, every field set.
pub fn train_spec_to_proto(spec: &TrainSpec) -> pb::TrainDenoiserSpec {
    let (latent, latent_size) = match spec.latent {
        LatentChoice::None => (pb::LatentSpace::Weights, 0),
        LatentChoice::PcaAuto => (pb::LatentSpace::Pca, 0),
        LatentChoice::Pca(k) => (pb::LatentSpace::Pca, k.clamp(0, i64::from(u32::MAX)) as u32),
        LatentChoice::Autoencoder(k) => (
            pb::LatentSpace::Autoencoder,
            k.clamp(0, i64::from(u32::MAX)) as u32,
        ),
    };
    let wide = |v: i64| v.clamp(0, i64::from(u32::MAX)) as u32;
    pb::TrainDenoiserSpec {
        zoo: spec.zoo.clone(),
        denoiser_id: spec.denoiser_id.clone().unwrap_or_default(),
        architecture: spec.architecture.clone().unwrap_or_default(),
        kind: match spec.kind {
            DenoiserKind::MlpUnet => pb::DenoiserKind::MlpUnet,
            DenoiserKind::LayerTransformer => pb::DenoiserKind::LayerTransformer,
            DenoiserKind::UnitTransformer => pb::DenoiserKind::UnitTransformer,
        } as i32,
        steps: Some(narrow(spec.steps)),
        batch_size: Some(wide(spec.batch_size)),
        learning_rate: Some(spec.learning_rate),
        lr_schedule: match spec.lr_schedule {
            LrSchedule::Constant => pb::LrSchedule::Constant,
            LrSchedule::Cosine => pb::LrSchedule::Cosine,
        } as i32,
        timesteps: Some(narrow(spec.timesteps)),
        schedule: match spec.schedule {
            NoiseSchedule::Cosine => pb::NoiseSchedule::Cosine,
            NoiseSchedule::Linear => pb::NoiseSchedule::Linear,
        } as i32,
        prediction: match spec.prediction {
            None => pb::Prediction::Unspecified,
            Some(Prediction::Epsilon) => pb::Prediction::Epsilon,
            Some(Prediction::X0) => pb::Prediction::X0,
            Some(Prediction::V) => pb::Prediction::V,
        } as i32,
        weight_decay: Some(spec.weight_decay),
        seed: spec.seed,
        latent: latent as i32,
        latent_size,
        latent_steps: Some(narrow(spec.latent_steps)),
        widths: spec.widths.iter().map(|&w| wide(w)).collect(),
        blocks_per_level: Some(narrow(spec.blocks_per_level)),
        conditioning: match spec.conditioning {
            Conditioning::Film => pb::Conditioning::Film,
            Conditioning::Concat => pb::Conditioning::Concat,
        } as i32,
        embed_dim: Some(wide(spec.embed_dim)),
        encoder_hidden: Some(wide(spec.encoder_hidden)),
        transformer_width: Some(wide(spec.transformer_width)),
        transformer_depth: Some(narrow(spec.transformer_depth)),
        transformer_heads: Some(wide(spec.transformer_heads)),
        cond_dropout: Some(spec.cond_dropout),
        feature_dropout: Some(spec.feature_dropout),
        support_dropout: Some(spec.support_dropout),
        ema_decay: Some(spec.ema_decay),
        val_fraction: Some(spec.val_fraction),
        align: match spec.align {
            AlignChoice::Auto => pb::Alignment::Auto,
            AlignChoice::Always => pb::Alignment::Always,
            AlignChoice::Never => pb::Alignment::Never,
        } as i32,
        max_models: spec.max_models.map(narrow),
        eval_tasks: Some(narrow(spec.eval_tasks)),
        eval_guidance: Some(spec.eval_guidance),
        log_every: Some(narrow(spec.log_every)),
        checkpoint_every: Some(narrow(spec.checkpoint_every)),
        precision: match spec.precision {
            PrecisionChoice::Auto => pb::TrainPrecision::Auto,
            PrecisionChoice::Fixed(Precision::Fp32) => pb::TrainPrecision::Fp32,
            PrecisionChoice::Fixed(Precision::Fp16) => pb::TrainPrecision::Fp16,
        } as i32,
        data_parallel: Some(narrow(spec.data_parallel)),
        train_windows: spec.train_windows.map(narrow),
        also_zoos: spec.also_zoos.clone(),
        activate: spec.activate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_request_is_the_default_spec() {
        let spec = pb::TrainDenoiserSpec {
            zoo: "z".into(),
            ..Default::default()
        };
        assert_eq!(train_spec_from_proto(&spec).unwrap(), TrainSpec::new("z"));
    }

    #[test]
    fn every_field_survives_the_round_trip() {
        let spec = TrainSpec {
            denoiser_id: Some("d".into()),
            architecture: Some("a".into()),
            kind: DenoiserKind::LayerTransformer,
            steps: 7,
            batch_size: 9,
            learning_rate: 0.5,
            lr_schedule: LrSchedule::Cosine,
            weight_decay: 0.25,
            timesteps: 11,
            schedule: NoiseSchedule::Linear,
            prediction: Some(Prediction::X0),
            seed: 13,
            latent: LatentChoice::Pca(5),
            widths: vec![3, 2],
            blocks_per_level: 4,
            conditioning: Conditioning::Concat,
            embed_dim: 17,
            encoder_hidden: 19,
            transformer_width: 96,
            transformer_depth: 2,
            transformer_heads: 8,
            cond_dropout: 0.01,
            feature_dropout: 0.02,
            support_dropout: 0.03,
            ema_decay: 0.04,
            val_fraction: 0.05,
            align: AlignChoice::Never,
            max_models: Some(23),
            eval_tasks: 29,
            eval_guidance: 2.5,
            log_every: 31,
            checkpoint_every: 37,
            precision: PrecisionChoice::Fixed(Precision::Fp16),
            data_parallel: 3,
            train_windows: Some(41),
            also_zoos: vec!["y".into(), "x".into()],
            activate: true,
            ..TrainSpec::new("z")
        };
        let back = train_spec_from_proto(&train_spec_to_proto(&spec)).unwrap();
        assert_eq!(back, spec);
        let units = TrainSpec {
            kind: DenoiserKind::UnitTransformer,
            ..spec
        };
        assert_eq!(
            train_spec_from_proto(&train_spec_to_proto(&units)).unwrap(),
            units
        );
        for latent in [
            LatentChoice::None,
            LatentChoice::PcaAuto,
            LatentChoice::Autoencoder(48),
        ] {
            let spec = TrainSpec {
                latent,
                ..TrainSpec::new("z")
            };
            assert_eq!(
                train_spec_from_proto(&train_spec_to_proto(&spec)).unwrap(),
                spec
            );
        }
        let zoo = ZooSpec {
            zoo: Some("n".into()),
            family: "digits".into(),
            architecture: "a".into(),
            num_models: 3,
            shared_init: true,
            seed: 5,
            steps: Some(7),
            learning_rate: Some(0.25),
            keep_snapshots: 2,
            base_steps: None,
        };
        assert_eq!(zoo_spec_from_proto(&zoo_spec_to_proto(&zoo)), zoo);
        let words = ZooSpec {
            family: "words".into(),
            base_steps: Some(40),
            ..zoo
        };
        assert_eq!(zoo_spec_from_proto(&zoo_spec_to_proto(&words)), words);
    }

    #[test]
    fn unknown_enum_values_and_stray_sizes_are_named() {
        let spec = pb::TrainDenoiserSpec {
            zoo: "z".into(),
            schedule: 99,
            ..Default::default()
        };
        let e = train_spec_from_proto(&spec).unwrap_err();
        assert_eq!(e.field, "train_denoiser.schedule");
        assert!(e.reason.contains("99"), "{e}");
        let spec = pb::TrainDenoiserSpec {
            zoo: "z".into(),
            latent: pb::LatentSpace::Weights as i32,
            latent_size: 8,
            ..Default::default()
        };
        assert_eq!(
            train_spec_from_proto(&spec).unwrap_err().field,
            "train_denoiser.latent_size"
        );
        let spec = pb::TrainDenoiserSpec {
            zoo: "z".into(),
            latent: pb::LatentSpace::Autoencoder as i32,
            ..Default::default()
        };
        let e = train_spec_from_proto(&spec).unwrap_err();
        assert_eq!(e.field, "train_denoiser.latent_size");
        assert!(e.reason.contains("needs a latent size"), "{e}");
    }
}
