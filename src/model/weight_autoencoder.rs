//! A learned latent of the standardized weights (p-diff / D2NWG style): an
//! encoder and a decoder MLP trained on the zoo to rebuild its models, with
//! noise on the input weights and on the latent so that the decoder maps
//! the neighbourhood of every zoo latent to working weights — what a
//! denoiser's imperfect samples land in. It is trained once, before the
//! denoiser, and frozen while the denoiser trains in its latent.
//!
//! Each side is a linear map plus a residual MLP whose output layer starts
//! at zero, and the linear maps start as the zoo's PCA: the autoencoder
//! begins as the PCA latent of the same size and training learns a
//! nonlinear correction on top of it. With validation models it keeps the
//! weights that rebuilt them best (checked every [`VALIDATE_EVERY`] steps,
//! the PCA start included), so it is never worse than the PCA on models it
//! did not see. Latent coordinates are standardized over the training zoo
//! afterwards (as the PCA latent's are), so the denoiser sees unit-scale
//! coordinates.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::adam::Adam;
use super::variables::fill_variables;
use crate::rng::{SeededNoise, splitmix64};
use crate::weights::PcaLatent;
use crate::weights::latent::RELATIVE_SCALE_FLOOR;

/// Default width of the hidden layers of both MLPs.
pub const DEFAULT_AE_HIDDEN: i64 = 512;
/// Default optimizer steps of the autoencoder's training.
pub const DEFAULT_AE_STEPS: usize = 3_000;
/// Default batch size (zoo models per step).
pub const DEFAULT_AE_BATCH: i64 = 64;
/// Default Adam learning rate.
pub const DEFAULT_AE_LEARNING_RATE: f64 = 1e-3;
/// Default std of the noise added to the standardized input weights
/// (p-diff adds noise to the input and to the latent).
pub const DEFAULT_AE_INPUT_NOISE: f64 = 0.05;
/// Default std of the latent noise, relative to each latent coordinate's
/// spread over the batch (so the encoder cannot outgrow it by scaling up).
pub const DEFAULT_AE_LATENT_NOISE: f64 = 0.1;

/// Copies of an autoencoder's tensors by name.
type Snapshot = Vec<(String, Tensor)>;

/// Steps between checks of the validation reconstruction error.
pub const VALIDATE_EVERY: usize = 100;

/// Noise streams of a fit (with its seed).
const INIT_STREAM: u64 = 0xae01;
const NOISE_STREAM: u64 = 0xae02;
const BATCH_STREAM: u64 = 0xae03;

/// Shape of an autoencoder (saved in the checkpoint header).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderConfig {
    /// D, the size of the standardized weight vector.
    pub input_dim: i64,
    /// K, the latent size.
    pub latent_dim: i64,
    /// Width of the hidden layers.
    pub hidden: i64,
}

/// How an autoencoder is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoencoderFit {
    /// Optimizer steps.
    pub steps: usize,
    /// Zoo models per step.
    pub batch_size: i64,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Std of the noise on the standardized input weights.
    pub input_noise: f64,
    /// Std of the latent noise relative to each coordinate's batch spread.
    pub latent_noise: f64,
    /// Seeds the initial weights, the batches and the noise.
    pub seed: u64,
}

impl Default for AutoencoderFit {
    fn default() -> Self {
        Self {
            steps: DEFAULT_AE_STEPS,
            batch_size: DEFAULT_AE_BATCH,
            learning_rate: DEFAULT_AE_LEARNING_RATE,
            input_noise: DEFAULT_AE_INPUT_NOISE,
            latent_noise: DEFAULT_AE_LATENT_NOISE,
            seed: 0,
        }
    }
}

/// One side of the autoencoder: linear map + residual MLP.
#[derive(Debug)]
struct Side {
    linear: nn::Linear,
    first: nn::Linear,
    second: nn::Linear,
    out: nn::Linear,
}

impl Side {
    fn new(path: nn::Path, input: i64, output: i64, hidden: i64) -> Self {
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        Self {
            linear: nn::linear(&path / "linear", input, output, Default::default()),
            first: nn::linear(&path / "first", input, hidden, Default::default()),
            second: nn::linear(&path / "second", hidden, hidden, Default::default()),
            out: nn::linear(&path / "out", hidden, output, zero),
        }
    }

    /// Seeded LeCun-normal hidden layers with zero biases.
    fn randomize_hidden(&mut self, noise: &mut SeededNoise) {
        let device = self.first.ws.device();
        tch::no_grad(|| {
            for layer in [&mut self.first, &mut self.second] {
                let dims = layer.ws.size();
                let fresh = noise.draw(&dims, device).squeeze_dim(0) / (dims[1] as f64).sqrt();
                layer.ws.copy_(&fresh);
                if let Some(bs) = &mut layer.bs {
                    let _ = bs.zero_();
                }
            }
        });
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.first.forward(x).silu();
        let h = self.second.forward(&h).silu();
        self.linear.forward(x) + self.out.forward(&h)
    }
}

/// A trained weight autoencoder.
#[derive(Debug)]
pub struct WeightAutoencoder {
    /// Its shape.
    pub config: AutoencoderConfig,
    /// Its weights, with the latent standardization ("z_mean", "z_scale").
    pub vs: nn::VarStore,
    encoder: Side,
    decoder: Side,
    z_mean: Tensor,
    z_scale: Tensor,
}

impl WeightAutoencoder {
    /// An untrained autoencoder on `device` (latent standardization 0 / 1).
    pub fn new(config: AutoencoderConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (d, k, h) = (config.input_dim, config.latent_dim, config.hidden);
        let encoder = Side::new(&root / "encoder", d, k, h);
        let decoder = Side::new(&root / "decoder", k, d, h);
        let z_mean = root.zeros_no_train("z_mean", &[k]);
        let z_scale = root.ones_no_train("z_scale", &[k]);
        Self {
            config,
            vs,
            encoder,
            decoder,
            z_mean,
            z_scale,
        }
    }

    /// Latent size K.
    pub fn dim(&self) -> i64 {
        self.config.latent_dim
    }

    /// Trains an autoencoder of latent size `k` on standardized weights
    /// `train` [N, D] (on `train`'s device), starting from their PCA; with
    /// `val` [M, D] it ends at the weights that rebuilt those best.
    pub fn fit(
        train: &Tensor,
        val: Option<&Tensor>,
        k: i64,
        hidden: i64,
        fit: &AutoencoderFit,
    ) -> Self {
        let train = train.to_kind(Kind::Float);
        let (n, d) = (train.size()[0], train.size()[1]);
        let k = k.min(n).min(d).max(1);
        let device = train.device();
        let mut ae = Self::new(
            AutoencoderConfig {
                input_dim: d,
                latent_dim: k,
                hidden,
            },
            device,
        );
        let pca = PcaLatent::fit(&train.to_device(Device::Cpu), k, fit.seed);
        ae.start_from_pca(&pca);
        // Everything random comes from the seed, none from libtorch's
        // global generator: the same seed gives the same autoencoder.
        let mut init = SeededNoise::new(&[fit.seed], INIT_STREAM);
        ae.encoder.randomize_hidden(&mut init);
        ae.decoder.randomize_hidden(&mut init);
        let mut noise = SeededNoise::new(&[fit.seed], NOISE_STREAM);
        let mut draw = |dims: &[i64]| noise.draw(dims, device).squeeze_dim(0);
        let mut state = splitmix64(fit.seed ^ BATCH_STREAM);
        let trainable = ae
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let mut adam = Adam::new(trainable, fit.learning_rate);
        let batch = fit.batch_size.clamp(1, n);
        let val = val
            .filter(|v| v.size()[0] > 0)
            .map(|v| v.to_kind(Kind::Float).to_device(device));
        // (validation error, step, the weights then)
        let mut best: Option<(f64, usize, Snapshot)> = None;
        for step in 0..=fit.steps {
            if let Some(val) = &val
                && step % VALIDATE_EVERY.max(1) == 0
            {
                let error = tch::no_grad(|| {
                    let rebuilt = ae.decoder.forward(&ae.encoder.forward(val));
                    (rebuilt - val)
                        .square()
                        .mean(Kind::Double)
                        .double_value(&[])
                });
                if best.as_ref().is_none_or(|(e, _, _)| error < *e) {
                    best = Some((error, step, ae.named_tensors_copied()));
                }
            }
            if step == fit.steps {
                break;
            }
            let rows: Vec<i64> = (0..batch)
                .map(|_| {
                    state = splitmix64(state);
                    (state % n as u64) as i64
                })
                .collect();
            let x = train.index_select(0, &Tensor::from_slice(&rows).to_device(device));
            let noisy = &x + draw(&[batch, d]) * fit.input_noise;
            let u = ae.encoder.forward(&noisy);
            // A batch of one has no spread to scale the latent noise by.
            let u = if batch > 1 {
                let spread = u.detach().std_dim(0, false, true);
                &u + draw(&[batch, k]) * spread * fit.latent_noise
            } else {
                u
            };
            let loss = (ae.decoder.forward(&u) - &x).square().mean(Kind::Float);
            adam.zero_grad();
            loss.backward();
            adam.step();
        }
        if let Some((error, step, weights)) = best {
            tracing::debug!(error, step, "autoencoder weights kept by validation");
            let lookup = |name: &str| {
                let (_, saved) = weights.iter().find(|(n, _)| n == name)?;
                Some(saved.shallow_clone())
            };
            let problems = fill_variables(&ae.vs, "", lookup);
            debug_assert!(problems.is_empty(), "{problems:?}");
        }
        tch::no_grad(|| ae.standardize_latent(&train));
        ae
    }

    /// Copies of its tensors (a snapshot that later steps do not change).
    fn named_tensors_copied(&self) -> Snapshot {
        self.vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach().copy()))
            .collect()
    }

    /// Sets both linear maps to the PCA's (scaled so that the latent is the
    /// PCA's unit-scale coordinates) and the residual MLPs' outputs to zero.
    fn start_from_pca(&mut self, pca: &PcaLatent) {
        let device = self.vs.device();
        let components = pca.components.to_device(device); // [k, D]
        let scales = pca.scales.to_device(device); // [k]
        let mean = pca.mean.to_device(device); // [D]
        tch::no_grad(|| {
            let encode = &components / scales.unsqueeze(1); // z = (w − m)Vᵀ/s
            self.encoder.linear.ws.copy_(&encode);
            let bias = -encode.matmul(&mean);
            if let Some(bs) = &mut self.encoder.linear.bs {
                bs.copy_(&bias);
            }
            let decode = (components * scales.unsqueeze(1)).tr(); // w = (z s)V + m
            self.decoder.linear.ws.copy_(&decode);
            if let Some(bs) = &mut self.decoder.linear.bs {
                bs.copy_(&mean);
            }
        });
    }

    /// Stores the mean and (floored) std of the training zoo's latents.
    fn standardize_latent(&mut self, train: &Tensor) {
        let u = self.encoder.forward(train);
        let mean = u.mean_dim(0, false, Kind::Float);
        let std = u.std_dim(0, false, false);
        let largest = std.max().double_value(&[]).max(f64::MIN_POSITIVE);
        self.z_mean.copy_(&mean);
        self.z_scale
            .copy_(&std.clamp_min(largest * RELATIVE_SCALE_FLOOR));
    }

    /// w̃ [B, D] → z [B, K].
    pub fn encode(&self, w: &Tensor) -> Tensor {
        let w = w.to_kind(Kind::Float).to_device(self.vs.device());
        (self.encoder.forward(&w) - &self.z_mean) / &self.z_scale
    }

    /// z [B, K] → w̃ [B, D].
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let z = z.to_kind(Kind::Float).to_device(self.vs.device());
        self.decoder.forward(&(z * &self.z_scale + &self.z_mean))
    }

    /// Its tensors by variable name, for a checkpoint.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach()))
            .collect()
    }

    /// Rebuilds an autoencoder from its config and tensors (`get` by
    /// variable name) on `device`; the error names what is missing or
    /// misshapen.
    pub fn from_tensors(
        config: AutoencoderConfig,
        get: impl FnMut(&str) -> Option<Tensor>,
        device: Device,
    ) -> Result<Self, String> {
        let ae = Self::new(config, device);
        let problems = fill_variables(&ae.vs, "", get);
        if problems.is_empty() {
            Ok(ae)
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededNoise;

    /// Points on a curved 2-D sheet in 30 dimensions: a linear latent of
    /// size 2 cannot hold them, a nonlinear one can.
    fn curved_zoo(n: i64) -> Tensor {
        let mut noise = SeededNoise::new(&[3], 1);
        let ab = noise.draw(&[n, 2], Device::Cpu).squeeze_dim(0);
        let (a, b) = (ab.narrow(1, 0, 1), ab.narrow(1, 1, 1));
        let features = Tensor::cat(
            &[
                a.shallow_clone(),
                b.shallow_clone(),
                a.square(),
                &a * &b,
                b.square(),
                a.sin(),
            ],
            1,
        );
        let mixing = noise.draw(&[6, 30], Device::Cpu).squeeze_dim(0) / 6f64.sqrt();
        features.matmul(&mixing)
    }

    fn reconstruction_error(
        encode: impl Fn(&Tensor) -> Tensor,
        decode: impl Fn(&Tensor) -> Tensor,
        zoo: &Tensor,
    ) -> f64 {
        tch::no_grad(|| {
            (decode(&encode(zoo)) - zoo)
                .square()
                .mean(Kind::Double)
                .double_value(&[])
        })
    }

    #[test]
    fn before_training_it_is_the_pca_latent_of_the_same_size() {
        let zoo = curved_zoo(200);
        let pca = PcaLatent::fit(&zoo, 3, 0);
        let mut ae = WeightAutoencoder::new(
            AutoencoderConfig {
                input_dim: 30,
                latent_dim: 3,
                hidden: 16,
            },
            Device::Cpu,
        );
        ae.start_from_pca(&pca);
        tch::no_grad(|| {
            let gap = (ae.encode(&zoo) - pca.encode(&zoo))
                .abs()
                .max()
                .double_value(&[]);
            assert!(gap < 1e-4, "encode differs from PCA by {gap}");
            let z = pca.encode(&zoo);
            let gap = (ae.decode(&z) - pca.decode(&z))
                .abs()
                .max()
                .double_value(&[]);
            assert!(gap < 1e-4, "decode differs from PCA by {gap}");
        });
    }

    #[test]
    fn training_beats_pca_on_a_curved_zoo_and_standardizes_the_latent() {
        let zoo = curved_zoo(400);
        let pca = PcaLatent::fit(&zoo, 2, 0);
        let fit = AutoencoderFit {
            steps: 1_500,
            input_noise: 0.0,
            latent_noise: 0.0,
            ..Default::default()
        };
        let ae = WeightAutoencoder::fit(&zoo, None, 2, 64, &fit);
        let pca_error = reconstruction_error(|w| pca.encode(w), |z| pca.decode(z), &zoo);
        let ae_error = reconstruction_error(|w| ae.encode(w), |z| ae.decode(z), &zoo);
        assert!(
            ae_error < 0.5 * pca_error,
            "autoencoder {ae_error} against PCA {pca_error}"
        );
        let z = tch::no_grad(|| ae.encode(&zoo));
        let mean = z
            .mean_dim(0, false, Kind::Float)
            .abs()
            .max()
            .double_value(&[]);
        let std = z.std_dim(0, false, false);
        assert!(mean < 1e-3, "latent mean {mean}");
        assert!((std - 1.0).abs().max().double_value(&[]) < 1e-3);
    }

    #[test]
    fn with_validation_models_it_keeps_the_weights_that_rebuilt_them_best() {
        // 30 training models of a curved zoo and a big net: it overfits
        // them, and the validation models say when to stop.
        let zoo = curved_zoo(230);
        let (train, val) = (zoo.narrow(0, 0, 30), zoo.narrow(0, 30, 200));
        let fit = AutoencoderFit {
            steps: 600,
            input_noise: 0.0,
            latent_noise: 0.0,
            ..Default::default()
        };
        let val_error =
            |ae: &WeightAutoencoder| reconstruction_error(|w| ae.encode(w), |z| ae.decode(z), &val);
        let free = WeightAutoencoder::fit(&train, None, 5, 256, &fit);
        let stopped = WeightAutoencoder::fit(&train, Some(&val), 5, 256, &fit);
        let pca = PcaLatent::fit(&train, 5, 0);
        let pca_error = reconstruction_error(|w| pca.encode(w), |z| pca.decode(z), &val);
        let (free, stopped) = (val_error(&free), val_error(&stopped));
        assert!(
            stopped < free && stopped <= pca_error * 1.0001,
            "validation-kept {stopped}, last step {free}, PCA {pca_error}"
        );
    }

    #[test]
    fn a_fit_is_reproducible_and_round_trips_through_its_tensors() {
        let zoo = curved_zoo(100);
        let fit = AutoencoderFit {
            steps: 20,
            ..Default::default()
        };
        let first = WeightAutoencoder::fit(&zoo, None, 2, 16, &fit);
        let second = WeightAutoencoder::fit(&zoo, None, 2, 16, &fit);
        let tensors: std::collections::HashMap<String, Tensor> =
            first.named_tensors().into_iter().collect();
        let loaded = WeightAutoencoder::from_tensors(
            first.config.clone(),
            |name| tensors.get(name).map(Tensor::shallow_clone),
            Device::Cpu,
        )
        .unwrap();
        tch::no_grad(|| {
            let z = first.encode(&zoo);
            assert_eq!(z, second.encode(&zoo), "same seed, same autoencoder");
            assert_eq!(z, loaded.encode(&zoo));
            assert_eq!(first.decode(&z), loaded.decode(&z));
        });
        let missing = WeightAutoencoder::from_tensors(first.config.clone(), |_| None, Device::Cpu);
        assert!(missing.unwrap_err().contains("missing"));
    }
}
