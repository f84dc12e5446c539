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
    /// For classification support sets (one-hot targets over several
    /// labels): also encode the per-label mean input ("prototypes",
    /// [labels × X] flattened), which states plainly which inputs each label
    /// stands for. A mean over φ([x, y]) can only learn that slowly.
    #[serde(default)]
    pub prototypes: bool,
}

impl TaskEncoderConfig {
    /// Whether the encoder builds the label-prototype branch: asked for,
    /// and the support targets are one-hots over several labels.
    pub fn has_prototypes(&self) -> bool {
        self.prototypes && self.support_x_dim > 0 && self.support_y_dim > 1
    }
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
    /// Rows [B] (bool) whose features are withheld: the features path adds
    /// nothing there, as when `features` is absent. Training sets it
    /// (feature dropout) so the encoder also learns the task from the
    /// support set alone.
    pub features_dropped: Option<Tensor>,
    /// Rows [B] (bool) whose support set is withheld: the support paths add
    /// nothing there, as when the support set is absent. Training sets it
    /// (support dropout) so the encoder also learns the task from the
    /// features alone — the request form of a client with no examples.
    pub support_dropped: Option<Tensor>,
    /// Which architecture each row is, for a denoiser of several
    /// (`weights::ArchUnion`): its descriptor [B, A]. The task encoder does
    /// not read it; the denoiser does, with or without the task.
    pub arch_descriptor: Option<Tensor>,
    /// The union coordinates each row's architecture has, as 0/1 [B, D].
    pub arch_mask: Option<Tensor>,
}

impl TaskBatch {
    /// Features only.
    pub fn features(features: Tensor) -> Self {
        Self {
            features: Some(features),
            support_x: None,
            support_y: None,
            features_dropped: None,
            support_dropped: None,
            arch_descriptor: None,
            arch_mask: None,
        }
    }

    /// No conditioning inputs at all (an unconditional model).
    pub fn unconditional() -> Self {
        Self {
            features: None,
            support_x: None,
            support_y: None,
            features_dropped: None,
            support_dropped: None,
            arch_descriptor: None,
            arch_mask: None,
        }
    }

    /// The support set alone: what a few-shot learner sees.
    pub fn support_only(self) -> Self {
        Self {
            features: None,
            features_dropped: None,
            ..self
        }
    }

    /// The features alone: what a client with no examples sends.
    pub fn features_only(self) -> Self {
        Self {
            support_x: None,
            support_y: None,
            support_dropped: None,
            ..self
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
            features_dropped: pick(&self.features_dropped),
            support_dropped: pick(&self.support_dropped),
            arch_descriptor: pick(&self.arch_descriptor),
            arch_mask: pick(&self.arch_mask),
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
            support_x: gather(self.support_x),
            support_y: gather(self.support_y),
            ..self
        }
    }

    /// The batch on `device`.
    pub fn to_device(&self, device: tch::Device) -> Self {
        let mv = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device));
        Self {
            features: mv(&self.features),
            support_x: mv(&self.support_x),
            support_y: mv(&self.support_y),
            features_dropped: mv(&self.features_dropped),
            support_dropped: mv(&self.support_dropped),
            arch_descriptor: mv(&self.arch_descriptor),
            arch_mask: mv(&self.arch_mask),
        }
    }
}

/// A path's contribution [B, E] with the `dropped` rows zeroed.
fn kept(contribution: Tensor, dropped: &Option<Tensor>, device: tch::Device) -> Tensor {
    match dropped {
        Some(dropped) => contribution
            .zeros_like()
            .where_self(&dropped.to_device(device).unsqueeze(1), &contribution),
        None => contribution,
    }
}

/// The encoder.
#[derive(Debug)]
pub struct TaskEncoder {
    config: TaskEncoderConfig,
    features: Option<(nn::Linear, nn::Linear)>,
    phi: Option<(nn::Linear, nn::Linear)>,
    rho: Option<nn::Linear>,
    prototypes: Option<(nn::Linear, nn::Linear)>,
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
        let prototypes = config.has_prototypes().then(|| {
            (
                nn::linear(
                    vs / "prototypes" / "0",
                    config.support_x_dim * config.support_y_dim,
                    h,
                    Default::default(),
                ),
                nn::linear(vs / "prototypes" / "1", h, e, Default::default()),
            )
        });
        Self {
            config: config.clone(),
            features,
            phi,
            rho,
            prototypes,
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
            e += kept(
                l1.forward(&l0.forward(f).silu()),
                &batch.features_dropped,
                device,
            );
        }
        if let (Some((p0, p1)), Some(rho), Some(x), Some(y)) =
            (&self.phi, &self.rho, &batch.support_x, &batch.support_y)
        {
            let pairs = Tensor::cat(&[x.shallow_clone(), y.shallow_clone()], 2);
            let pooled =
                p1.forward(&p0.forward(&pairs).silu())
                    .silu()
                    .mean_dim(1, false, Kind::Float);
            e += kept(rho.forward(&pooled), &batch.support_dropped, device);
        }
        if let (Some((l0, l1)), Some(x), Some(y)) =
            (&self.prototypes, &batch.support_x, &batch.support_y)
        {
            // y [B, K, W] one-hot, x [B, K, X]: mean x per label [B, W, X];
            // a label without examples gets zeros.
            let counts = y
                .sum_dim_intlist(1, false, Kind::Float)
                .clamp_min(1.0)
                .unsqueeze(-1);
            let means = y.transpose(1, 2).matmul(x) / counts;
            e += kept(
                l1.forward(&l0.forward(&means.flatten(1, -1)).silu()),
                &batch.support_dropped,
                device,
            );
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
impl TaskEncoderConfig {
    /// A small encoder of `feature_dim` features alone (hidden width 8), for
    /// tests.
    pub(crate) fn small_features_only(feature_dim: i64, embed_dim: i64) -> Self {
        Self {
            feature_dim,
            support_x_dim: 0,
            support_y_dim: 0,
            hidden: 8,
            embed_dim,
            prototypes: false,
        }
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
            features_dropped: None,
            support_dropped: None,
            arch_descriptor: None,
            arch_mask: None,
        };
        let pick = Tensor::from_slice(&[2i64, 0, 1, 2]).view([2, 2]);
        let kept = batch.with_support_subsets(&pick);
        let got = Vec::<f32>::try_from(kept.support_x.unwrap().reshape([-1])).unwrap();
        assert_eq!(got, vec![2.0, 0.0, 11.0, 12.0]);
        assert_eq!(kept.support_y.unwrap().size(), vec![2, 2, 1]);
    }

    #[test]
    fn a_row_with_a_dropped_input_embeds_the_other_alone() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let encoder = TaskEncoder::new(
            &vs.root(),
            &TaskEncoderConfig {
                feature_dim: 3,
                support_x_dim: 2,
                support_y_dim: 1,
                hidden: 8,
                embed_dim: 4,
                prototypes: false,
            },
        );
        let full = || TaskBatch {
            features: Some(Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0, 0.0, -1.0]).view([2, 3])),
            support_x: Some(Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4]).view([2, 1, 2])),
            support_y: Some(Tensor::from_slice(&[1.0f32, 0.0]).view([2, 1, 1])),
            features_dropped: None,
            support_dropped: None,
            arch_descriptor: None,
            arch_mask: None,
        };
        let both = encoder.forward(&full(), 2, None);
        let support = encoder.forward(&full().support_only(), 2, None);
        let dropped = TaskBatch {
            features_dropped: Some(Tensor::from_slice(&[true, false])),
            ..full()
        };
        let mixed = encoder.forward(&dropped, 2, None);
        assert!(mixed.get(0).allclose(&support.get(0), 1e-6, 1e-6, false));
        assert!(mixed.get(1).allclose(&both.get(1), 1e-6, 1e-6, false));
        let features = encoder.forward(&full().features_only(), 2, None);
        let withheld = TaskBatch {
            support_dropped: Some(Tensor::from_slice(&[false, true])),
            ..full()
        };
        let mixed = encoder.forward(&withheld, 2, None);
        assert!(mixed.get(0).allclose(&both.get(0), 1e-6, 1e-6, false));
        assert!(mixed.get(1).allclose(&features.get(1), 1e-6, 1e-6, false));
        assert!(!both.get(1).allclose(&features.get(1), 1e-3, 1e-3, false));
        // The features do move the embedding (so the test can fail).
        assert!(!both.get(0).allclose(&support.get(0), 1e-3, 1e-3, false));
    }

    #[test]
    fn prototypes_see_which_inputs_each_label_stands_for() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let encoder = TaskEncoder::new(
            &vs.root(),
            &TaskEncoderConfig {
                feature_dim: 0,
                support_x_dim: 2,
                support_y_dim: 2,
                hidden: 8,
                embed_dim: 4,
                prototypes: true,
            },
        );
        assert!(encoder.prototypes.is_some());
        let batch = |x: &[f32], y: &[f32]| TaskBatch {
            features: None,
            support_x: Some(Tensor::from_slice(x).view([1, 3, 2])),
            support_y: Some(Tensor::from_slice(y).view([1, 3, 2])),
            features_dropped: None,
            support_dropped: None,
            arch_descriptor: None,
            arch_mask: None,
        };
        let x = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.2];
        let labels = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0];
        let e = encoder.forward(&batch(&x, &labels), 1, None);
        // The same examples in another order: the same embedding.
        let shuffled_x = [0.0f32, 1.0, 1.0, 0.2, 1.0, 0.0];
        let shuffled_y = [0.0f32, 1.0, 1.0, 0.0, 1.0, 0.0];
        let same = encoder.forward(&batch(&shuffled_x, &shuffled_y), 1, None);
        assert!(e.allclose(&same, 1e-6, 1e-6, false));
        // The labels swapped: another task, another embedding.
        let swapped = [0.0f32, 1.0, 1.0, 0.0, 0.0, 1.0];
        let other = encoder.forward(&batch(&x, &swapped), 1, None);
        assert!(!e.allclose(&other, 1e-3, 1e-3, false));
    }
}
