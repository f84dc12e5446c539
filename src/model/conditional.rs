//! `ConditionalDenoiser`: task encoder + network + schedule, with the
//! full-width path as preconditioning.
//!
//! Why preconditioning: standardized weights have unit variance per
//! coordinate, and for w₀ ~ N(0, I) the optimal predictors are exactly
//! E[ε | w_t] = sqrt(1−ᾱ_t)·w_t, E[w₀ | w_t] = sqrt(ᾱ_t)·w_t and E[v | w_t] = 0.
//! So the output is that isotropic solution plus the network's correction:
//! ε̂ = sqrt(1−ᾱ_t)·w_t + F(w_t, t, e) (x̂₀ = sqrt(ᾱ_t)·w_t + F for
//! x₀-prediction; v̂ = F for v-prediction, whose conversion to ε̂ and x̂₀
//! already passes w_t through). The network only learns the structure of
//! the zoo, which is low-rank, so a hidden width H < D suffices; without the
//! skip the ε-loss would plateau near 1 − H/D. The output layer of F starts
//! at zero, so a fresh model is the isotropic optimum.

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::layer_transformer::{LayerTransformer, LayerTransformerConfig, TokenLayout};
use super::mlp_unet::{MlpUnet, MlpUnetConfig};
use super::task_encoder::{TaskBatch, TaskEncoder, TaskEncoderConfig};
use super::tokens::{TokenGroup, groups_of, single_group};
use crate::diffusion::objective::mse_loss;
use crate::diffusion::schedule::{DEFAULT_TIMESTEPS, NoiseSchedule, ScheduleError, ScheduleKind};
use crate::diffusion::{Denoiser, Prediction};
use crate::weights::{NeuronGroup, NeuronLayout};

/// Which network F.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetConfig {
    /// The proposal's MLP U-Net with FiLM.
    MlpUnet(MlpUnetConfig),
    /// Layer-factorized token transformer with adaLN.
    LayerTransformer(LayerTransformerConfig),
}

/// Everything that defines a denoiser's shape and maths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenoiserConfig {
    /// Length D of the vectors it diffuses.
    pub dim: i64,
    /// The network.
    pub net: NetConfig,
    /// The task encoder.
    pub encoder: TaskEncoderConfig,
    /// Output parametrization.
    pub prediction: Prediction,
    /// Noise schedule.
    pub schedule: ScheduleKind,
    /// Diffusion steps T (1000 by default, the proposal's).
    pub timesteps: usize,
    /// Add the isotropic full-width path (see the module docs).
    pub preconditioning: bool,
    /// Layer layout of the vector, for the layer-factorized network; empty
    /// means one flat group (e.g. a latent).
    #[serde(default)]
    pub groups: Vec<TokenGroup>,
    /// Length of the architecture descriptor when the denoiser generates
    /// several architectures in one union vector (`weights::ArchUnion`);
    /// 0: one architecture.
    #[serde(default)]
    pub architecture_dim: i64,
    /// The layout's hidden units, when the network makes a token of each
    /// (`TokenLayout::Units`); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<NeuronGroup>,
}

impl DenoiserConfig {
    /// The proposal's defaults (cosine schedule, T = 1000, ε-prediction, MLP
    /// U-Net) for vectors of length `dim` and the given encoder.
    pub fn new(dim: i64, encoder: TaskEncoderConfig) -> Self {
        Self {
            dim,
            net: NetConfig::MlpUnet(MlpUnetConfig::default()),
            encoder,
            prediction: Prediction::Epsilon,
            schedule: ScheduleKind::cosine(),
            timesteps: DEFAULT_TIMESTEPS,
            preconditioning: true,
            groups: Vec::new(),
            architecture_dim: 0,
            units: Vec::new(),
        }
    }

    /// Takes the layer layout of an architecture (when diffusing its
    /// standardized weights directly), and its hidden units when the
    /// network is to make tokens of them and the architecture has any.
    pub fn with_layout(mut self, spec: &crate::weights::ArchSpec) -> Self {
        self.groups = groups_of(spec);
        if self.uses_unit_tokens() {
            self.units = NeuronLayout::new(spec)
                .map(|layout| layout.groups)
                .unwrap_or_default();
        }
        self
    }

    /// Whether the network makes a token of each hidden unit.
    pub fn uses_unit_tokens(&self) -> bool {
        matches!(&self.net, NetConfig::LayerTransformer(c) if c.tokens == TokenLayout::Units)
    }
}

#[derive(Debug)]
enum Net {
    MlpUnet(MlpUnet),
    LayerTransformer(LayerTransformer),
}

/// A task-conditioned denoiser and its variables.
pub struct ConditionalDenoiser {
    /// The variables (denoiser under "net", encoder under "encoder").
    pub vs: VarStore,
    config: DenoiserConfig,
    net: Net,
    encoder: TaskEncoder,
    schedule: NoiseSchedule,
    /// Descriptor → a term added to the task embedding (present when
    /// `architecture_dim` > 0).
    architecture: Option<tch::nn::Linear>,
    /// The architecture rows generate when their condition names none: the
    /// one a checkpoint was loaded for (descriptor [1, A], mask [1, D]).
    fixed_architecture: Option<(Tensor, Tensor)>,
}

impl std::fmt::Debug for ConditionalDenoiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConditionalDenoiser")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ConditionalDenoiser {
    /// A freshly initialized denoiser on `device`.
    pub fn new(config: DenoiserConfig, device: Device) -> Result<Self, ScheduleError> {
        let schedule = NoiseSchedule::new(config.schedule, config.timesteps)?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let encoder = TaskEncoder::new(&(&root / "encoder"), &config.encoder);
        let architecture = (config.architecture_dim > 0).then(|| {
            super::blocks::zero_linear(
                &root / "architecture",
                config.architecture_dim,
                config.encoder.embed_dim,
            )
        });
        let net = match &config.net {
            NetConfig::MlpUnet(c) => Net::MlpUnet(MlpUnet::new(
                &(&root / "net"),
                c,
                config.dim,
                config.encoder.embed_dim,
            )),
            NetConfig::LayerTransformer(c) => {
                let groups = if config.groups.is_empty() {
                    single_group(config.dim as usize)
                } else {
                    config.groups.clone()
                };
                Net::LayerTransformer(LayerTransformer::new(
                    &(&root / "net"),
                    c,
                    &groups,
                    &config.units,
                    config.dim as usize,
                    config.encoder.embed_dim,
                ))
            }
        };
        Ok(Self {
            vs,
            config,
            net,
            encoder,
            schedule,
            architecture,
            fixed_architecture: None,
        })
    }

    /// Makes rows whose condition names no architecture generate the one
    /// with this descriptor [A] and mask [D] (0/1): what a checkpoint of
    /// several architectures loaded for one of them does.
    pub fn set_architecture(&mut self, descriptor: &[f32], mask: &[f32]) {
        let device = self.device();
        self.fixed_architecture = Some((
            Tensor::from_slice(descriptor)
                .view([1, -1])
                .to_device(device),
            Tensor::from_slice(mask).view([1, -1]).to_device(device),
        ));
    }

    /// The architecture descriptor [B, A] and mask [B, D] of `rows` rows:
    /// the condition's, else the fixed one; None for a one-architecture
    /// denoiser.
    fn architecture_rows(
        &self,
        descriptor: Option<&Tensor>,
        mask: Option<&Tensor>,
        rows: i64,
    ) -> Option<(Tensor, Tensor)> {
        self.architecture.as_ref()?;
        match (descriptor, mask, &self.fixed_architecture) {
            (Some(d), Some(m), _) => Some((d.shallow_clone(), m.shallow_clone())),
            (_, _, Some((d, m))) => {
                Some((d.expand([rows, -1], false), m.expand([rows, -1], false)))
            }
            _ => None,
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &DenoiserConfig {
        &self.config
    }

    /// Its noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The device its variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The task encoder.
    pub fn encoder(&self) -> &TaskEncoder {
        &self.encoder
    }

    /// Freezes the network for sampling (the MLP U-Net's time table and
    /// stacked FiLM projections; nothing for the layer transformer). Loading a
    /// checkpoint does this; a model that is still training must not (the
    /// tables are detached copies: `loss` would not train the time MLP or
    /// FiLM, and the tables would go stale).
    pub fn prepare_for_sampling(&mut self) {
        if let Net::MlpUnet(net) = &mut self.net {
            net.prepare_for_sampling(self.config.timesteps as i64 + 1);
        }
    }

    /// Whether `prepare_for_sampling` ran.
    pub fn is_prepared_for_sampling(&self) -> bool {
        matches!(&self.net, Net::MlpUnet(net) if net.is_prepared_for_sampling())
    }

    /// Model output for w_t [B, D] at t [B] given embeddings e [B, E] (for
    /// the fixed architecture, if the denoiser has several).
    pub fn output(&self, w_t: &Tensor, t: &Tensor, e: &Tensor) -> Tensor {
        let architecture = self.architecture_rows(None, None, w_t.size()[0]);
        self.output_for(w_t, t, e, architecture.as_ref())
    }

    /// [`Self::output`] for the given architecture rows (descriptor, mask):
    /// the network sees only the architecture's coordinates and its
    /// descriptor added to e, and corrects only those coordinates.
    fn output_for(
        &self,
        w_t: &Tensor,
        t: &Tensor,
        e: &Tensor,
        architecture: Option<&(Tensor, Tensor)>,
    ) -> Tensor {
        let (input, e) = self.architecture_inputs(w_t, e, architecture);
        let correction = match &self.net {
            Net::MlpUnet(net) => net.forward(&input, t, &e),
            Net::LayerTransformer(net) => net.forward(&input, t, &e),
        };
        self.preconditioned(Self::masked(correction, architecture), w_t, t)
    }

    /// The network's inputs for the architecture rows: w_t on their
    /// coordinates only, e plus the descriptor's term.
    fn architecture_inputs(
        &self,
        w_t: &Tensor,
        e: &Tensor,
        architecture: Option<&(Tensor, Tensor)>,
    ) -> (Tensor, Tensor) {
        match (architecture, &self.architecture) {
            (Some((descriptor, mask)), Some(map)) => (
                w_t * mask,
                e + tch::nn::Module::forward(map, &descriptor.to_kind(tch::Kind::Float)),
            ),
            _ => (w_t.shallow_clone(), e.shallow_clone()),
        }
    }

    /// The correction on the architecture rows' coordinates only.
    fn masked(correction: Tensor, architecture: Option<&(Tensor, Tensor)>) -> Tensor {
        match architecture {
            Some((_, mask)) => correction * mask,
            None => correction,
        }
    }

    /// The network's correction F plus the isotropic path (module docs).
    fn preconditioned(&self, correction: Tensor, w_t: &Tensor, t: &Tensor) -> Tensor {
        // v-prediction's conversions pass w_t through already; the ᾱ lookup
        // is eight small kernels, so it runs only where it is used.
        if !self.config.preconditioning || self.config.prediction == Prediction::V {
            return correction;
        }
        match self.config.prediction {
            Prediction::X0 => correction + w_t * self.schedule.coefficients(t).0,
            Prediction::Epsilon => correction + w_t * self.schedule.coefficients(t).1,
            Prediction::V => correction,
        }
    }

    /// How many attention windows the network cuts a vector into (the
    /// layer transformer's; 1 for the MLP U-Net, which sees it whole).
    pub fn window_count(&self) -> usize {
        match &self.net {
            Net::MlpUnet(_) => 1,
            Net::LayerTransformer(net) => net.window_count(),
        }
    }

    /// The proposal's loss ‖target − output‖² (mean per coordinate) for clean
    /// weights w₀ [B, D], timesteps t [B], noise ε [B, D]; rows where `drop`
    /// is true are trained unconditionally (for guidance).
    pub fn loss(
        &self,
        w0: &Tensor,
        condition: &TaskBatch,
        t: &Tensor,
        noise: &Tensor,
        drop: Option<&Tensor>,
    ) -> Tensor {
        self.loss_on(w0, condition, t, noise, drop, None)
    }

    /// [`Self::loss`] over the coordinates of the given attention windows
    /// only, which the layer transformer then alone computes (indices below
    /// [`Self::window_count`]); None, or the MLP U-Net: every coordinate.
    pub fn loss_on(
        &self,
        w0: &Tensor,
        condition: &TaskBatch,
        t: &Tensor,
        noise: &Tensor,
        drop: Option<&Tensor>,
        windows: Option<&[usize]>,
    ) -> Tensor {
        debug_assert!(
            !self.is_prepared_for_sampling(),
            "a network prepared for sampling is not trained (prepare_for_sampling)"
        );
        let w_t = self.schedule.q_sample(w0, t, noise);
        let rows = w0.size()[0];
        let e = self.encoder.forward(condition, rows, drop);
        let (a, b) = self.schedule.coefficients(t);
        let target = self.config.prediction.target(w0, noise, &a, &b);
        let architecture = self.architecture_rows(
            condition.arch_descriptor.as_ref(),
            condition.arch_mask.as_ref(),
            rows,
        );
        // Only an architecture's own coordinates are scored.
        let loss = |output: &Tensor, target: &Tensor, mask: Option<&Tensor>| match mask {
            Some(mask) => {
                ((output - target).square() * mask).sum(tch::Kind::Float)
                    / mask.sum(tch::Kind::Float).clamp_min(1.0)
            }
            None => mse_loss(output, target),
        };
        match (windows, &self.net) {
            (Some(windows), Net::LayerTransformer(net)) => {
                let architecture = architecture.as_ref();
                let (input, e) = self.architecture_inputs(&w_t, &e, architecture);
                let (correction, coords) = net.forward_windows(&input, t, &e, windows);
                let output = self.preconditioned(Self::masked(correction, architecture), &w_t, t);
                let pick = |x: &Tensor| x.index_select(1, &coords);
                let mask = architecture.map(|(_, m)| pick(m));
                loss(&pick(&output), &pick(&target), mask.as_ref())
            }
            _ => {
                let output = self.output_for(&w_t, t, &e, architecture.as_ref());
                loss(&output, &target, architecture.as_ref().map(|(_, m)| m))
            }
        }
    }
}

#[cfg(test)]
impl ConditionalDenoiser {
    /// Sets every variable to fixed values drawn like an initialization
    /// (normal, scaled by 1/sqrt(fan-in)) from `seed` and the variables'
    /// name order: for tests whose outcome must not depend on libtorch's
    /// global generator, which tests running in parallel share.
    pub(crate) fn set_test_weights(&self, seed: u64) {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (i, (_, var)) in vars.iter_mut().enumerate() {
                let size = var.size();
                let fan_in = size.last().copied().unwrap_or(1).max(1);
                let values = crate::rng::SeededNoise::new(&[seed], i as u64)
                    .draw(&size, var.device())
                    .squeeze_dim(0)
                    / (fan_in as f64).sqrt();
                var.copy_(&values);
            }
        });
    }
}

impl Denoiser for ConditionalDenoiser {
    type Condition = TaskBatch;

    fn forward(
        &self,
        w_t: &Tensor,
        t: &Tensor,
        condition: &TaskBatch,
        drop_condition: bool,
    ) -> Tensor {
        let e = if drop_condition {
            self.encoder.null(w_t.size()[0])
        } else {
            self.encoder.forward(condition, w_t.size()[0], None)
        };
        let architecture = self.architecture_rows(
            condition.arch_descriptor.as_ref(),
            condition.arch_mask.as_ref(),
            w_t.size()[0],
        );
        self.output_for(w_t, t, &e, architecture.as_ref())
    }

    fn prediction(&self) -> Prediction {
        self.config.prediction
    }
}

/// Task embeddings computed once for a whole sampling run (the encoder does
/// not depend on t, so there is no reason to rerun it at every step).
#[derive(Debug)]
pub struct Embedded {
    /// e [B, E].
    pub embedding: Tensor,
    /// The condition's architecture rows (descriptor, mask), if it names them.
    pub architecture: Option<(Tensor, Tensor)>,
}

impl ConditionalDenoiser {
    /// Runs the task encoder once for `rows` samples.
    pub fn embed(&self, condition: &TaskBatch, rows: i64) -> Embedded {
        let condition = condition.to_device(self.device());
        Embedded {
            embedding: tch::no_grad(|| self.encoder.forward(&condition, rows, None)),
            architecture: condition
                .arch_descriptor
                .as_ref()
                .zip(condition.arch_mask.as_ref())
                .map(|(d, m)| (d.shallow_clone(), m.shallow_clone())),
        }
    }

    /// This denoiser with embeddings precomputed by [`Self::embed`].
    pub fn with_embeddings(&self) -> PreEmbedded<'_> {
        PreEmbedded(self)
    }
}

/// A [`ConditionalDenoiser`] whose condition is an [`Embedded`]: the same
/// outputs as conditioning on the `TaskBatch`, one encoder pass per run.
#[derive(Debug)]
pub struct PreEmbedded<'a>(&'a ConditionalDenoiser);

impl Denoiser for PreEmbedded<'_> {
    type Condition = Embedded;

    fn forward(&self, w_t: &Tensor, t: &Tensor, condition: &Embedded, drop: bool) -> Tensor {
        let e = if drop {
            self.0.encoder.null(w_t.size()[0])
        } else {
            condition.embedding.shallow_clone()
        };
        let architecture = self.0.architecture_rows(
            condition.architecture.as_ref().map(|(d, _)| d),
            condition.architecture.as_ref().map(|(_, m)| m),
            w_t.size()[0],
        );
        self.0.output_for(w_t, t, &e, architecture.as_ref())
    }

    fn prediction(&self) -> Prediction {
        self.0.config.prediction
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Conditioning, MlpUnetConfig, TaskEncoderConfig};
    use tch::Kind;

    fn unet(conditioning: Conditioning) -> ConditionalDenoiser {
        let encoder = TaskEncoderConfig::small_features_only(2, 4);
        let mut config = DenoiserConfig::new(6, encoder);
        config.timesteps = 100;
        config.net = NetConfig::MlpUnet(MlpUnetConfig {
            widths: vec![16, 8],
            blocks_per_level: 2,
            time_dim: 8,
            conditioning,
            ..Default::default()
        });
        let model = ConditionalDenoiser::new(config, Device::Cpu).unwrap();
        model.set_test_weights(3);
        model
    }

    #[test]
    fn the_loss_over_every_window_is_the_loss() {
        // Of one architecture, and of a union's with some coordinates not its own.
        for architecture in [false, true] {
            loss_over_windows(architecture);
        }
    }

    fn loss_over_windows(architecture: bool) {
        use crate::model::LayerTransformerConfig;
        let encoder = TaskEncoderConfig::small_features_only(2, 4);
        let mut config = DenoiserConfig::new(30, encoder);
        config.architecture_dim = if architecture { 2 } else { 0 };
        config.timesteps = 100;
        config.net = NetConfig::LayerTransformer(LayerTransformerConfig {
            token_size: 4,
            hidden: 16,
            depth: 1,
            heads: 2,
            time_dim: 8,
            condition_tokens: 1,
            window: 3,
            ..Default::default()
        });
        let model = ConditionalDenoiser::new(config, Device::Cpu).unwrap();
        model.set_test_weights(5);
        assert_eq!(model.window_count(), 3);
        let mut noise = crate::diffusion::SeededNoise::new(&[1, 2], 0);
        let w0 = noise.draw(&[30], Device::Cpu).squeeze_dim(0);
        let eps = noise.draw(&[30], Device::Cpu).squeeze_dim(0);
        let mask: Vec<f32> = (0..60).map(|i| f32::from(i % 30 < 20)).collect();
        let condition = TaskBatch {
            features: Some(Tensor::ones([2, 2], (Kind::Float, Device::Cpu))),
            arch_descriptor: architecture
                .then(|| Tensor::from_slice(&[1f32, 0.5, 1.0, 0.5]).view([2, 2])),
            arch_mask: architecture.then(|| Tensor::from_slice(&mask).view([2, 30])),
            ..TaskBatch::unconditional()
        };
        let t = Tensor::from_slice(&[5i64, 80]);
        let loss = |windows: Option<&[usize]>| {
            tch::no_grad(|| model.loss_on(&w0, &condition, &t, &eps, None, windows))
                .double_value(&[])
        };
        let all = loss(None);
        assert!(all > 0.0);
        assert!((loss(Some(&[2, 0, 1])) - all).abs() < 1e-5 * all);
        assert!((loss(Some(&[1])) - all).abs() > 1e-4 * all);
    }

    #[test]
    fn an_architecture_sees_and_is_scored_on_its_own_coordinates_only() {
        let encoder = TaskEncoderConfig::small_features_only(2, 4);
        let mut config = DenoiserConfig::new(6, encoder);
        config.timesteps = 100;
        config.architecture_dim = 2;
        config.net = NetConfig::MlpUnet(MlpUnetConfig {
            widths: vec![16, 8],
            blocks_per_level: 1,
            time_dim: 8,
            ..Default::default()
        });
        let mut model = ConditionalDenoiser::new(config, Device::Cpu).unwrap();
        model.set_test_weights(7);
        let mask = [1f32, 1.0, 1.0, 0.0, 0.0, 0.0];
        let rows = |values: &[f32]| Tensor::from_slice(values).view([2, -1]);
        let condition = TaskBatch {
            arch_descriptor: Some(rows(&[1.0, 0.5, 1.0, 0.5])),
            arch_mask: Some(rows(&[mask, mask].concat())),
            ..TaskBatch::features(Tensor::ones([2, 2], (Kind::Float, Device::Cpu)))
        };
        let t = Tensor::from_slice(&[5i64, 80]);
        let w0 = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([2, 6]) / 12.0;
        let eps = Tensor::ones([2, 6], (Kind::Float, Device::Cpu)) * 0.3;
        // Other values off the architecture's coordinates: the same loss.
        let elsewhere = &w0 + rows(&[[0f32, 0.0, 0.0, 5.0, -5.0, 9.0]; 2].concat());
        let loss = |w: &Tensor| {
            tch::no_grad(|| model.loss(w, &condition, &t, &eps, None)).double_value(&[])
        };
        assert!(loss(&w0) > 0.0);
        assert_eq!(loss(&w0), loss(&elsewhere));
        // Set for sampling: the fixed architecture gives the same outputs
        // on its coordinates, and the descriptor changes them.
        let e = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let w_t = Tensor::ones([2, 6], (Kind::Float, Device::Cpu));
        model.set_architecture(&[1.0, 0.5], &mask);
        let fixed = tch::no_grad(|| model.output(&w_t, &t, &e)).narrow(1, 0, 3);
        let with_rows = tch::no_grad(|| model.forward(&w_t, &t, &condition, false)).narrow(1, 0, 3);
        let e_row = model.encoder.forward(&condition, 2, None);
        let direct = tch::no_grad(|| model.output(&w_t, &t, &e_row)).narrow(1, 0, 3);
        assert!(with_rows.allclose(&direct, 1e-6, 1e-6, false));
        model.set_architecture(&[1.0, 1.0], &mask);
        let other = tch::no_grad(|| model.output(&w_t, &t, &e)).narrow(1, 0, 3);
        assert!(!fixed.allclose(&other, 1e-6, 1e-6, false));
    }

    #[test]
    fn a_network_prepared_for_sampling_computes_what_it_computed() {
        for conditioning in [Conditioning::Film, Conditioning::Concat] {
            let mut model = unet(conditioning);
            let w = Tensor::arange(30, (Kind::Float, Device::Cpu)).view([5, 6]) / 30.0 - 0.5;
            let t = Tensor::from_slice(&[0i64, 1, 42, 99, 100]);
            let e = Tensor::arange(20, (Kind::Float, Device::Cpu)).view([5, 4]) / 20.0;
            let before = tch::no_grad(|| model.output(&w, &t, &e));
            model.prepare_for_sampling();
            let after = tch::no_grad(|| model.output(&w, &t, &e));
            let scale = before.abs().max().double_value(&[]);
            assert!(
                scale > 0.1,
                "{conditioning:?}: the test weights must do something"
            );
            let gap = (&after - &before).abs().max().double_value(&[]);
            assert!(
                gap <= 1e-5 * scale,
                "{conditioning:?}: prepared differs by {gap}"
            );
        }
    }
}
