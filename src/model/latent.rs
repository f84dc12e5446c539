//! The latent a denoiser diffuses in, when it does not diffuse the
//! standardized weights themselves: a PCA of the zoo or a learned
//! autoencoder. Both map w̃ [B, D] ↔ z [B, K] with unit-scale coordinates.

use tch::Tensor;

use super::weight_autoencoder::WeightAutoencoder;
use crate::weights::PcaLatent;

/// A fitted latent.
#[derive(Debug)]
pub enum Latent {
    /// Linear: the zoo's top principal directions.
    Pca(PcaLatent),
    /// Nonlinear: an encoder/decoder pair trained on the zoo.
    Autoencoder(Box<WeightAutoencoder>),
}

impl Latent {
    /// Latent size K.
    pub fn dim(&self) -> i64 {
        match self {
            Self::Pca(pca) => pca.dim(),
            Self::Autoencoder(ae) => ae.dim(),
        }
    }

    /// Its kind as the API names it: "pca" or "autoencoder".
    pub fn space(&self) -> &'static str {
        match self {
            Self::Pca(_) => "pca",
            Self::Autoencoder(_) => "autoencoder",
        }
    }

    /// w̃ [B, D] → z [B, K], on w̃'s device.
    pub fn encode(&self, w: &Tensor) -> Tensor {
        let device = w.device();
        tch::no_grad(|| match self {
            Self::Pca(pca) => pca.encode(w),
            Self::Autoencoder(ae) => ae.encode(w).to_device(device),
        })
    }

    /// z [B, K] → w̃ [B, D], on z's device.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let device = z.device();
        tch::no_grad(|| match self {
            Self::Pca(pca) => pca.decode(z),
            Self::Autoencoder(ae) => ae.decode(z).to_device(device),
        })
    }

    /// Mean squared error of rebuilding standardized weights [N, D]
    /// through the latent (how much of the zoo it keeps).
    pub fn reconstruction_mse(&self, w: &Tensor) -> f64 {
        let w = w.to_kind(tch::Kind::Float);
        (self.decode(&self.encode(&w)) - &w)
            .square()
            .mean(tch::Kind::Double)
            .double_value(&[])
    }
}
