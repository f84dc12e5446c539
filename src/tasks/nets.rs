//! The small networks zoo models use, written functionally over a list of
//! parameter tensors in `ArchSpec` order (so a flat weight vector, a
//! safetensors file and a training run all share one layout), with
//! PyTorch's default initialization and the module names PyTorch's
//! `nn.Sequential` would give them.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::words::lm::{ByteLmConfig, LoraConfig, lora_init};
use crate::rng::SeededNoise;
use crate::weights::{ArchSpec, DType, LayerGroup, LayoutError, TensorSpec};

/// How to run an architecture's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetKind {
    /// Linear layers with ReLU between (`nn.Sequential(Linear, ReLU, …)`).
    Mlp,
    /// `nn.Sequential(Conv2d(1,c1,3,p=1), ReLU, MaxPool2d(2), Conv2d(c1,c2,3,p=1),
    /// ReLU, MaxPool2d(2), Flatten, Linear)` over 1×8×8 images.
    SmallCnn,
    /// An MLP over fixed Fourier features [sin(2π Bx), cos(2π Bx)] of 2-D
    /// coordinates (B: `frequencies` × 2, drawn once from N(0, scale²)).
    FourierMlp {
        /// Number of frequencies (feature width = 2 × this).
        frequencies: usize,
        /// Standard deviation of B.
        scale: f64,
        /// Seed of B.
        seed: u64,
    },
    /// A LoRA adapter of a `words` base model: it runs inside the base
    /// (`tasks::words::lm`), never on inputs alone.
    LoraAdapter {
        /// The base model's shape.
        base: ByteLmConfig,
        /// Rank and scale.
        lora: LoraConfig,
    },
}

/// Why a network cannot compute outputs from inputs alone.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{network}: a LoRA adapter runs inside its base model (tasks::words), not on inputs alone")]
pub struct RunsInBase {
    /// The network's name.
    pub network: String,
}

/// An architecture with the way to run it.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// Names, shapes and layers.
    pub spec: ArchSpec,
    /// How the parameters compute.
    pub kind: NetKind,
}

impl Network {
    /// An MLP of the given widths.
    pub fn mlp(name: &str, family: &str, sizes: &[usize]) -> Result<Self, LayoutError> {
        Ok(Self {
            spec: ArchSpec::sequential_mlp(name, family, sizes)?,
            kind: NetKind::Mlp,
        })
    }

    /// The small CNN for 8×8 digits with `classes` outputs.
    pub fn small_cnn(
        name: &str,
        family: &str,
        c1: usize,
        c2: usize,
        classes: usize,
    ) -> Result<Self, LayoutError> {
        let conv = |i: usize, out: usize, inp: usize| {
            (
                vec![
                    TensorSpec::new(format!("{i}.weight"), &[out, inp, 3, 3], DType::F32),
                    TensorSpec::new(format!("{i}.bias"), &[out], DType::F32),
                ],
                LayerGroup {
                    name: i.to_string(),
                    kind: "conv2d".into(),
                    tensors: vec![format!("{i}.weight"), format!("{i}.bias")],
                },
            )
        };
        let (t0, l0) = conv(0, c1, 1);
        let (t3, l3) = conv(3, c2, c1);
        let linear = vec![
            TensorSpec::new("7.weight", &[classes, c2 * 4], DType::F32),
            TensorSpec::new("7.bias", &[classes], DType::F32),
        ];
        let l7 = LayerGroup {
            name: "7".into(),
            kind: "linear".into(),
            tensors: vec!["7.weight".into(), "7.bias".into()],
        };
        Ok(Self {
            spec: ArchSpec::new(name, family, [t0, t3, linear].concat(), vec![l0, l3, l7])?,
            kind: NetKind::SmallCnn,
        })
    }

    /// PyTorch's default initialization (kaiming-uniform with a = √5 for
    /// weights, U(−1/√fan_in, 1/√fan_in) for biases; both bounds are
    /// 1/√fan_in), drawn from `seed`; PEFT's for a LoRA adapter
    /// ([`lora_init`]: A the same bound, B zero).
    pub fn init(&self, seed: u64, device: Device) -> Vec<Tensor> {
        if let NetKind::LoraAdapter { base, lora } = &self.kind {
            return lora_init(*base, *lora, seed)
                .into_iter()
                .map(|(_, t)| t.to_device(device))
                .collect();
        }
        let mut noise = SeededNoise::new(&[seed], 0x1417);
        let mut fan_in = 1;
        self.spec
            .tensors
            .iter()
            .map(|t| {
                if t.shape.len() >= 2 {
                    fan_in = t.shape[1..].iter().product::<usize>();
                }
                let bound = 1.0 / (fan_in as f64).sqrt();
                // Uniform from the normal stream: Φ(z) is U(0, 1).
                let z = noise.draw(&t.shape_i64(), device).squeeze_dim(0);
                let u = (z / std::f64::consts::SQRT_2).erf() * 0.5 + 0.5;
                (u * 2.0 - 1.0) * bound
            })
            .collect()
    }

    /// Outputs for inputs `x` ([B, in] for MLPs, [B, 64] or [B, 1, 8, 8]
    /// for the CNN, [B, 2] coordinates for the Fourier MLP). A LoRA adapter
    /// has none alone (its family has no tensor task data either).
    pub fn forward(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor, RunsInBase> {
        Ok(match &self.kind {
            NetKind::LoraAdapter { .. } => {
                return Err(RunsInBase {
                    network: self.spec.name.clone(),
                });
            }
            NetKind::Mlp => mlp_forward(params, x),
            NetKind::SmallCnn => {
                let x = x.reshape([-1, 1, 8, 8]);
                let h = x
                    .conv2d(&params[0], Some(&params[1]), [1, 1], [1, 1], [1, 1], 1)
                    .relu()
                    .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
                let h = h
                    .conv2d(&params[2], Some(&params[3]), [1, 1], [1, 1], [1, 1], 1)
                    .relu()
                    .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
                h.flatten(1, -1).linear(&params[4], Some(&params[5]))
            }
            NetKind::FourierMlp { .. } => mlp_forward(params, &self.fourier_features(x)),
        })
    }

    /// [sin(2π xBᵀ), cos(2π xBᵀ)] for the Fourier MLP; `x` itself otherwise.
    pub fn fourier_features(&self, x: &Tensor) -> Tensor {
        match &self.kind {
            NetKind::FourierMlp {
                frequencies,
                scale,
                seed,
            } => {
                let b = SeededNoise::new(&[*seed], 0xF0F)
                    .draw(&[*frequencies as i64, 2], x.device())
                    .squeeze_dim(0)
                    * *scale;
                let proj = x.to_kind(Kind::Float).matmul(&b.tr()) * (2.0 * std::f64::consts::PI);
                Tensor::cat(&[proj.sin(), proj.cos()], 1)
            }
            _ => x.shallow_clone(),
        }
    }
}

fn mlp_forward(params: &[Tensor], x: &Tensor) -> Tensor {
    let layers = params.len() / 2;
    let mut h = x.to_kind(Kind::Float);
    for i in 0..layers {
        h = h.linear(&params[2 * i], Some(&params[2 * i + 1]));
        if i + 1 < layers {
            h = h.relu();
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_has_pytorch_bounds_and_depends_on_the_seed() {
        let net = Network::mlp("m", "t", &[64, 32, 5]).unwrap();
        let a = net.init(1, Device::Cpu);
        let b = net.init(2, Device::Cpu);
        assert_eq!(a.len(), 4);
        let bound = 1.0 / 8.0;
        let max = a[0].abs().max().double_value(&[]);
        assert!(max <= bound && max > 0.9 * bound, "{max}");
        assert!(a[1].abs().max().double_value(&[]) <= bound);
        // Second layer: fan_in 32.
        assert!(a[2].abs().max().double_value(&[]) <= 1.0 / 32f64.sqrt());
        assert!(!a[0].equal(&b[0]));
        assert!(a[0].equal(&net.init(1, Device::Cpu)[0]));
        let mean = a[0].mean(Kind::Double).double_value(&[]);
        assert!(mean.abs() < 0.01, "uniform around 0: {mean}");
    }

    #[test]
    fn shapes_flow_through_every_kind() {
        let cnn = Network::small_cnn("c", "digits", 8, 16, 5).unwrap();
        let p = cnn.init(0, Device::Cpu);
        assert_eq!(
            cnn.forward(&p, &Tensor::ones([3, 64], (Kind::Float, Device::Cpu)))
                .unwrap()
                .size(),
            [3, 5]
        );
        let inr = Network {
            spec: ArchSpec::sequential_mlp("f", "digit-inr", &[32, 32, 1]).unwrap(),
            kind: NetKind::FourierMlp {
                frequencies: 16,
                scale: 2.0,
                seed: 0,
            },
        };
        let p = inr.init(0, Device::Cpu);
        assert_eq!(
            inr.forward(&p, &Tensor::zeros([7, 2], (Kind::Float, Device::Cpu)))
                .unwrap()
                .size(),
            [7, 1]
        );
    }
}
