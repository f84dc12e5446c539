//! What a training run trains on: one zoo standardized per dimension (in
//! its latent, if any), or several zoos of other architectures in the union
//! of their weight spaces (`union`); the feature standardization, the
//! conditions of training and validation rows, and the denoiser's shape.

use tch::{Device, Kind, Tensor};

use super::{TrainDenoiserConfig, TrainError, latent, union};
use crate::model::{
    DenoiserConfig, Latent, TaskBatch, TaskEncoderConfig, UnionMembership, standardize_features,
};
use crate::weights::novelty::{DEFAULT_SPREAD_QUANTILE, MAX_REFERENCE_BYTES};
use crate::weights::{DEFAULT_STD_FLOOR, NeuronLayout, Stats, StatsMode, ZooReference};
use crate::zoo::ZooDataset;

/// The condition of zoo rows `rows`: standardized features and the fixed
/// support sets, or (`pooled`) the support pools training draws subsets from.
fn task_batch(
    data: &ZooDataset,
    rows: &Tensor,
    norm: &(Tensor, Tensor),
    pooled: bool,
) -> TaskBatch {
    let support = if pooled {
        data.support_pool.as_ref().or(data.support.as_ref())
    } else {
        data.support.as_ref()
    };
    TaskBatch {
        features: Some(standardize_features(
            &data.features.index_select(0, rows),
            norm,
        )),
        support_x: support.map(|(x, _)| x.index_select(0, rows)),
        support_y: support.map(|(_, y)| y.index_select(0, rows)),
        features_dropped: None,
        support_dropped: None,
        arch_descriptor: None,
        arch_mask: None,
    }
}

/// What a run trains on, in the space its denoiser diffuses.
pub(super) struct Prepared {
    pub stats: Stats,
    pub latent: Option<Latent>,
    /// How much of unseen zoo models the latent keeps (standardized units).
    pub latent_val_mse: Option<f64>,
    pub denoiser_config: DenoiserConfig,
    pub feature_norm: (Tensor, Tensor),
    pub train_data: Tensor,
    pub val_data: Tensor,
    pub train_condition: TaskBatch,
    pub val_condition: TaskBatch,
    pub zoo_reference: Option<ZooReference>,
    pub union: Option<UnionMembership>,
}

/// The task encoder for `data`'s inputs.
fn encoder_config(data: &ZooDataset, config: &TrainDenoiserConfig) -> TaskEncoderConfig {
    TaskEncoderConfig {
        feature_dim: data.features.size()[1],
        support_x_dim: data.support.as_ref().map_or(0, |(x, _)| x.size()[2]),
        support_y_dim: data.support.as_ref().map_or(0, |(_, y)| y.size()[2]),
        hidden: config.encoder_hidden,
        embed_dim: config.embed_dim,
        // Used where the support targets are labels (digits).
        prototypes: true,
    }
}

/// Mean and floored std of the training rows' task features.
fn feature_norm_of(features: &Tensor) -> (Tensor, Tensor) {
    (
        features.mean_dim(0, false, Kind::Float),
        features.std_dim(0, false, false).clamp_min(1e-3),
    )
}

/// One zoo: standardized per dimension (pooled over each hidden layer's
/// units for a network on unit tokens), in its latent if it has one.
pub(super) fn prepare_one(
    data: &ZooDataset,
    train: &[i64],
    val: &[i64],
    config: &TrainDenoiserConfig,
) -> Result<Prepared, TrainError> {
    let device = config.device;
    let spec = &data.network.spec;
    let mut denoiser_config = DenoiserConfig::new(0, encoder_config(data, config));
    denoiser_config.net = config.net.clone();
    let unit_tokens = denoiser_config.uses_unit_tokens();
    if let (true, Err(e)) = (unit_tokens, NeuronLayout::new(spec)) {
        return Err(TrainError::Input {
            field: "kind",
            reason: format!("unit tokens need hidden units to permute: {e}"),
        });
    }
    if unit_tokens && config.latent != latent::LatentChoice::None {
        return Err(TrainError::Input {
            field: "latent",
            reason: "unit tokens are made of the weights themselves: latent must be none".into(),
        });
    }
    let train_rows = Tensor::from_slice(train);
    let val_rows = Tensor::from_slice(val);
    let train_w = data.weights.index_select(0, &train_rows);
    let mode = match unit_tokens {
        true => StatsMode::PerUnitSlot,
        false => StatsMode::PerDimension,
    };
    let stats = Stats::fit(&train_w, mode, spec, DEFAULT_STD_FLOOR);
    let standardized = stats.normalize(&data.weights).to_kind(Kind::Float);
    // Diffusion runs in the latent when there is one: fitted on the
    // training split only, so validation models are as unseen as any task.
    let val_standardized = standardized.index_select(0, &val_rows);
    let latent = latent::fit_latent(
        config.latent,
        config.latent_steps,
        &standardized.index_select(0, &train_rows),
        &val_standardized,
        train,
        data,
        &stats,
        config.fit.seed,
        device,
    );
    let latent_val_mse = match &latent {
        Some(latent) if !val.is_empty() => Some(latent.reconstruction_mse(&val_standardized)),
        _ => None,
    };
    let diffused = match &latent {
        Some(latent) => latent.encode(&standardized),
        None => standardized,
    };
    let feature_norm = feature_norm_of(&data.features.index_select(0, &train_rows));
    denoiser_config.dim = diffused.size()[1];
    if latent.is_none() {
        // The layer layout only means something for the weights themselves.
        denoiser_config = denoiser_config.with_layout(spec);
    }
    Ok(Prepared {
        train_condition: task_batch(data, &train_rows, &feature_norm, true),
        val_condition: task_batch(data, &val_rows, &feature_norm, false),
        train_data: diffused.index_select(0, &train_rows),
        val_data: diffused.index_select(0, &val_rows),
        zoo_reference: ZooReference::fit(&train_w, MAX_REFERENCE_BYTES, DEFAULT_SPREAD_QUANTILE),
        stats,
        latent,
        latent_val_mse,
        denoiser_config,
        feature_norm,
        union: None,
    })
}

/// Several zoos in the union of their architectures (`union`).
pub(super) fn prepare_union(
    datasets: &[ZooDataset],
    splits: &[(Vec<i64>, Vec<i64>)],
    config: &TrainDenoiserConfig,
) -> Result<Prepared, TrainError> {
    let zoos = union::UnionZoos::new(datasets)?;
    let train: Vec<Vec<i64>> = splits.iter().map(|(t, _)| t.clone()).collect();
    let stats = zoos.stats(&train, DEFAULT_STD_FLOOR);
    let all_train_features = Tensor::cat(
        &datasets
            .iter()
            .zip(&train)
            .map(|(d, rows)| d.features.index_select(0, &Tensor::from_slice(rows)))
            .collect::<Vec<_>>(),
        0,
    );
    let feature_norm = feature_norm_of(&all_train_features);
    let (mut train_data, mut val_data, mut train_conditions, mut val_conditions) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (k, (data, (train, val))) in datasets.iter().zip(splits).enumerate() {
        let standardized = zoos.standardized(k, &stats);
        for (rows, pooled, weights, conditions) in [
            (train, true, &mut train_data, &mut train_conditions),
            (val, false, &mut val_data, &mut val_conditions),
        ] {
            let index = Tensor::from_slice(rows);
            weights.push(standardized.index_select(0, &index));
            let (descriptor, mask) = zoos.architecture_rows(k, rows.len() as i64);
            conditions.push(TaskBatch {
                arch_descriptor: Some(descriptor),
                arch_mask: Some(mask),
                ..task_batch(data, &index, &feature_norm, pooled)
            });
        }
    }
    let mut denoiser_config = DenoiserConfig::new(
        zoos.union.dim() as i64,
        encoder_config(&datasets[0], config),
    )
    .with_layout(zoos.union.spec());
    denoiser_config.architecture_dim = zoos.union.descriptor_len() as i64;
    Ok(Prepared {
        stats,
        latent: None,
        latent_val_mse: None,
        denoiser_config,
        feature_norm,
        train_data: Tensor::cat(&train_data, 0),
        val_data: Tensor::cat(&val_data, 0),
        train_condition: union::concat(train_conditions),
        val_condition: union::concat(val_conditions),
        zoo_reference: None,
        union: Some(UnionMembership {
            references: union::UnionZoos::references(datasets, &train),
            union: zoos.union,
            indices: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
        }),
    })
}
