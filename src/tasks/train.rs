//! Training and scoring one zoo model: Adam on the family's loss, full
//! batch or minibatches, with the last few snapshots kept on request.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::nets::{Network, RunsInBase};

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Class indices; cross-entropy, accuracy.
    Classification,
    /// Real targets [B, 1]; mean squared error.
    Regression,
    /// Next-token logits [B, L, V] against token targets [B, L]; bits per
    /// byte (lower is better).
    LanguageModel,
}

impl Objective {
    /// Whether a lower test metric is better (MSE, bits per byte).
    pub fn lower_is_better(self) -> bool {
        self != Self::Classification
    }

    /// The metric's name in reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Classification => "accuracy",
            Self::Regression => "MSE",
            Self::LanguageModel => "bits per byte",
        }
    }

    /// The test metric's key in a model's metrics.
    pub fn test_metric(self) -> &'static str {
        match self {
            Self::Classification => "test_accuracy",
            Self::Regression => "test_mse",
            Self::LanguageModel => "test_bits_per_byte",
        }
    }
}

/// Why a zoo model could not be trained.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// libtorch failed.
    #[error("training: {0}")]
    Torch(#[from] tch::TchError),
    /// The network does not run alone.
    #[error(transparent)]
    RunsInBase(#[from] RunsInBase),
}

/// A task's data on one device.
#[derive(Debug)]
pub struct TaskData {
    /// Training inputs.
    pub train_x: Tensor,
    /// Training targets (int64 labels or [B, 1] floats).
    pub train_y: Tensor,
    /// Test inputs.
    pub test_x: Tensor,
    /// Test targets.
    pub test_y: Tensor,
}

/// How a zoo model is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Rows per step; 0 = the whole training set.
    pub batch_size: usize,
    /// Keep this many evenly spaced snapshots, the last one being the end.
    #[serde(default)]
    pub keep_snapshots: usize,
}

/// A trained model.
#[derive(Debug)]
pub struct TrainedModel {
    /// Final parameters, in `ArchSpec` order.
    pub params: Vec<Tensor>,
    /// train_/test_ loss and accuracy (classification) or mse.
    pub metrics: BTreeMap<String, f64>,
    /// (step, parameters) of the kept snapshots, final excluded.
    pub snapshots: Vec<(u64, Vec<Tensor>)>,
}

/// Loss of `outputs` against `targets`.
pub fn loss(objective: Objective, outputs: &Tensor, targets: &Tensor) -> Tensor {
    match objective {
        Objective::Classification => outputs.cross_entropy_for_logits(targets),
        Objective::Regression => outputs.mse_loss(targets, tch::Reduction::Mean),
        Objective::LanguageModel => {
            let vocab = outputs.size().last().copied().unwrap_or(1);
            outputs
                .reshape([-1, vocab])
                .cross_entropy_for_logits(&targets.reshape([-1]))
                / std::f64::consts::LN_2
        }
    }
}

/// train_/test_ metrics of `params` on `data`.
pub fn evaluate(
    net: &Network,
    params: &[Tensor],
    data: &TaskData,
    objective: Objective,
) -> Result<BTreeMap<String, f64>, RunsInBase> {
    tch::no_grad(|| {
        let mut out = BTreeMap::new();
        for (split, x, y) in [
            ("train", &data.train_x, &data.train_y),
            ("test", &data.test_x, &data.test_y),
        ] {
            let outputs = net.forward(params, x)?;
            match objective {
                Objective::Classification => {
                    out.insert(
                        format!("{split}_loss"),
                        loss(objective, &outputs, y).double_value(&[]),
                    );
                    let accuracy = outputs
                        .argmax(1, false)
                        .eq_tensor(y)
                        .to_kind(Kind::Double)
                        .mean(Kind::Double)
                        .double_value(&[]);
                    out.insert(format!("{split}_accuracy"), accuracy);
                }
                Objective::Regression => {
                    out.insert(
                        format!("{split}_mse"),
                        loss(objective, &outputs, y).double_value(&[]),
                    );
                }
                Objective::LanguageModel => {
                    out.insert(
                        format!("{split}_bits_per_byte"),
                        loss(objective, &outputs, y).double_value(&[]),
                    );
                }
            }
        }
        Ok(out)
    })
}

/// Trains from `init` with `config`; minibatch order from `seed`.
pub fn train(
    net: &Network,
    init: &[Tensor],
    data: &TaskData,
    objective: Objective,
    config: &TrainConfig,
    seed: u64,
) -> Result<TrainedModel, TrainError> {
    let device = init.first().map_or(Device::Cpu, Tensor::device);
    let vs = nn::VarStore::new(device);
    let params: Vec<Tensor> = init
        .iter()
        .enumerate()
        .map(|(i, t)| vs.root().var_copy(&format!("p{i}"), t))
        .collect();
    let mut optimizer = nn::Adam::default().build(&vs, config.learning_rate)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let n = data.train_x.size()[0];
    let snapshot_every =
        (config.keep_snapshots > 0).then(|| (config.steps / config.keep_snapshots).max(1));
    let mut snapshots = Vec::new();
    for step in 1..=config.steps {
        let (x, y) = if config.batch_size == 0 || config.batch_size as i64 >= n {
            (data.train_x.shallow_clone(), data.train_y.shallow_clone())
        } else {
            let index: Vec<i64> = (0..config.batch_size)
                .map(|_| rng.random_range(0..n))
                .collect();
            let index = Tensor::from_slice(&index).to_device(device);
            (
                data.train_x.index_select(0, &index),
                data.train_y.index_select(0, &index),
            )
        };
        let l = loss(objective, &net.forward(&params, &x)?, &y);
        optimizer.backward_step(&l);
        if let Some(every) = snapshot_every
            && step % every == 0
            && step < config.steps
        {
            snapshots.push((
                step as u64,
                params.iter().map(|p| p.detach().copy()).collect(),
            ));
        }
    }
    let keep_before_end = config.keep_snapshots.saturating_sub(1);
    let drop = snapshots.len().saturating_sub(keep_before_end);
    snapshots.drain(..drop);
    let params: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
    Ok(TrainedModel {
        metrics: evaluate(net, &params, data, objective)?,
        params,
        snapshots,
    })
}
