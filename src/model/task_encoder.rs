//! The task encoder: e = MLP(standardized descriptor features) plus
//! ρ(mean_k φ([x_k, y_k])) over a few-shot support set (DeepSets),
//! trained jointly with the denoiser. Either input may be absent. A learned
//! null embedding stands for "no condition" (classifier-free guidance).

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Shape of the task encoder; a zero input size disables that input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEncoderConfig {
    /// Number of descriptor features F (0 = none).
    pub feature_dim: i64,
    /// Size of one support input x (0 = no support set).
    pub support_x_dim: i64,
    /// Size of one support target y (a one-hot for classes).
    pub support_y_dim: i64,
    /// Hidden width of the encoders.
    pub hidden: i64,
    /// Embedding size E.
    pub embed_dim: i64,
}

/// The conditioning inputs of a batch (rows aligned with the weights).
#[derive(Debug)]
pub struct TaskBatch {
    /// Standardized features [B, F].
    pub features: Option<Tensor>,
    /// Support inputs [B, K, X].
    pub support_x: Option<Tensor>,
    /// Support targets [B, K, Y].
    pub support_y: Option<Tensor>,
}

impl TaskBatch {
    /// Features only.
    pub fn features(features: Tensor) -> Self {
        Self {
            features: Some(features),
            support_x: None,
            support_y: None,
        }
    }

    /// No conditioning inputs at all (an unconditional model).
    pub fn unconditional() -> Self {
        Self {
            features: None,
            support_x: None,
            support_y: None,
        }
    }

    /// Rows `index` [n] (int64).
    pub fn select(&self, index: &Tensor) -> Self {
        let pick = |t: &Option<Tensor>| {
            t.as_ref()
                .map(|t| t.index_select(0, &index.to_device(t.device())))
        };
        Self {
            features: pick(&self.features),
            support_x: pick(&self.support_x),
            support_y: pick(&self.support_y),
        }
    }

    /// Keeps, for each row b, the support examples `pick[b, :]` (a [B, K]
    /// index into the row's support set).
    pub fn with_support_subsets(self, pick: &Tensor) -> Self {
        let gather = |t: Option<Tensor>| {
            t.map(|t| {
                let (b, k, width) = (pick.size()[0], pick.size()[1], t.size()[2]);
                let index = pick
                    .to_device(t.device())
                    .unsqueeze(-1)
                    .expand([b, k, width], false);
                t.gather(1, &index, false)
            })
        };
        Self {
            features: self.features,
            support_x: gather(self.support_x),
            support_y: gather(self.support_y),
        }
    }

    /// The batch on `device`.
    pub fn to_device(&self, device: tch::Device) -> Self {
        let mv = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device));
        Self {
            features: mv(&self.features),
            support_x: mv(&self.support_x),
            support_y: mv(&self.support_y),
        }
    }
}

/// The encoder.
#[derive(Debug)]
pub struct TaskEncoder {
    config: TaskEncoderConfig,
    features: Option<(nn::Linear, nn::Linear)>,
    phi: Option<(nn::Linear, nn::Linear)>,
    rho: Option<nn::Linear>,
    null: Tensor,
}

impl TaskEncoder {
    /// Builds the encoder under `vs`.
    pub fn new(vs: &nn::Path, config: &TaskEncoderConfig) -> Self {
        let (h, e) = (config.hidden, config.embed_dim);
        let features = (config.feature_dim > 0).then(|| {
            (
                nn::linear(
                    vs / "features" / "0",
                    config.feature_dim,
                    h,
                    Default::default(),
                ),
                nn::linear(vs / "features" / "1", h, e, Default::default()),
            )
        });
        let pair = config.support_x_dim + config.support_y_dim;
        let phi = (config.support_x_dim > 0).then(|| {
            (
                nn::linear(vs / "phi" / "0", pair, h, Default::default()),
                nn::linear(vs / "phi" / "1", h, h, Default::default()),
            )
        });
        let rho =
            (config.support_x_dim > 0).then(|| nn::linear(vs / "rho", h, e, Default::default()));
        Self {
            config: config.clone(),
            features,
            phi,
            rho,
            null: vs.var(
                "null",
                &[e],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
        }
    }

    /// e [rows, E]; rows where `drop` [rows] (bool) is true get the null
    /// embedding. `rows` is explicit because a batch may carry no inputs at
    /// all (an unconditional model).
    pub fn forward(&self, batch: &TaskBatch, rows: i64, drop: Option<&Tensor>) -> Tensor {
        let b = rows;
        let device = self.null.device();
        let mut e = Tensor::zeros([b, self.config.embed_dim], (Kind::Float, device));
        if let (Some((l0, l1)), Some(f)) = (&self.features, &batch.features) {
            e += l1.forward(&l0.forward(f).silu());
        }
        if let (Some((p0, p1)), Some(rho), Some(x), Some(y)) =
            (&self.phi, &self.rho, &batch.support_x, &batch.support_y)
        {
            let pairs = Tensor::cat(&[x.shallow_clone(), y.shallow_clone()], 2);
            let pooled =
                p1.forward(&p0.forward(&pairs).silu())
                    .silu()
                    .mean_dim(1, false, Kind::Float);
            e += rho.forward(&pooled);
        }
        let null = self
            .null
            .unsqueeze(0)
            .expand([b, self.config.embed_dim], false);
        match drop {
            Some(mask) => null.where_self(&mask.unsqueeze(1), &e),
            None => e,
        }
    }

    /// The null embedding for every row.
    pub fn null(&self, batch: i64) -> Tensor {
        self.null
            .unsqueeze(0)
            .expand([batch, self.config.embed_dim], false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn support_subsets_keep_the_picked_examples_of_each_row() {
        // Row r's example j holds the value 10·r + j.
        let x = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 10.0, 11.0, 12.0]).view([2, 3, 1]);
        let batch = TaskBatch {
            features: None,
            support_x: Some(x.shallow_clone()),
            support_y: Some(x),
        };
        let pick = Tensor::from_slice(&[2i64, 0, 1, 2]).view([2, 2]);
        let kept = batch.with_support_subsets(&pick);
        let got = Vec::<f32>::try_from(kept.support_x.unwrap().reshape([-1])).unwrap();
        assert_eq!(got, vec![2.0, 0.0, 11.0, 12.0]);
        assert_eq!(kept.support_y.unwrap().size(), vec![2, 2, 1]);
    }
}
