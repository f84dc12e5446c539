//! The proposal's denoiser: an MLP U-Net of FiLM residual blocks. The input
//! is projected to the first width, goes down through narrower levels and
//! back up, with a skip connection from each down block to its mirror.
//!
//! The network alone cannot carry w_t through a hidden width H < D (its
//! ε-loss would plateau near 1 − H/D); the full-width path is added by
//! `ConditionalDenoiser` as preconditioning (see there).

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{self, Module};

use super::blocks::{Conditioning, FilmBlock, TimeCondition, zero_linear};

/// Residual blocks per level on each side, by default.
pub const DEFAULT_BLOCKS_PER_LEVEL: usize = 2;

/// Shape of the MLP U-Net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpUnetConfig {
    /// Widths of the levels, widest first, e.g. [512, 256].
    pub widths: Vec<i64>,
    /// Residual blocks per level on each side.
    pub blocks_per_level: usize,
    /// Size of the time embedding τ(t).
    pub time_dim: i64,
    /// How blocks take in the condition (FiLM in the proposal).
    #[serde(default)]
    pub conditioning: Conditioning,
    /// A LayerNorm before the output layer. Off by default: it fixes the
    /// norm of the correction F, which must grow like 1/sqrt(1 − ᾱ_t) as t
    /// shrinks; with it a latent denoiser learned nothing (held-out digits
    /// 0.22 zero-shot against 0.69 without, docs/RESULTS.md). Checkpoints
    /// written before the option existed have it.
    #[serde(default = "output_norm_of_older_checkpoints")]
    pub output_norm: bool,
}

fn output_norm_of_older_checkpoints() -> bool {
    true
}

impl Default for MlpUnetConfig {
    fn default() -> Self {
        Self {
            widths: vec![512, 256],
            blocks_per_level: DEFAULT_BLOCKS_PER_LEVEL,
            time_dim: 128,
            conditioning: Conditioning::Film,
            output_norm: false,
        }
    }
}

/// The network F(w_t, t, e).
#[derive(Debug)]
pub struct MlpUnet {
    time: TimeCondition,
    input: nn::Linear,
    down: Vec<Vec<FilmBlock>>,
    down_proj: Vec<nn::Linear>,
    middle: FilmBlock,
    up_proj: Vec<nn::Linear>,
    merge: Vec<Vec<nn::Linear>>,
    up: Vec<Vec<FilmBlock>>,
    out_norm: Option<nn::LayerNorm>,
    output: nn::Linear,
}

impl MlpUnet {
    /// Builds the network for weight vectors of length `dim` and task
    /// embeddings of length `cond_dim`.
    pub fn new(vs: &nn::Path, config: &MlpUnetConfig, dim: i64, cond_dim: i64) -> Self {
        let widths = &config.widths;
        let c_dim = config.time_dim + cond_dim;
        let levels = widths.len();
        let blocks = |prefix: &str, level: usize| -> Vec<FilmBlock> {
            (0..config.blocks_per_level)
                .map(|b| {
                    FilmBlock::with_conditioning(
                        &(vs / prefix / level / b),
                        widths[level],
                        c_dim,
                        config.conditioning,
                    )
                })
                .collect()
        };
        Self {
            time: TimeCondition::new(vs, config.time_dim),
            input: nn::linear(vs / "input", dim, widths[0], Default::default()),
            down: (0..levels).map(|l| blocks("down", l)).collect(),
            down_proj: (0..levels - 1)
                .map(|l| {
                    nn::linear(
                        vs / "down_proj" / l,
                        widths[l],
                        widths[l + 1],
                        Default::default(),
                    )
                })
                .collect(),
            middle: FilmBlock::with_conditioning(
                &(vs / "middle"),
                widths[levels - 1],
                c_dim,
                config.conditioning,
            ),
            up_proj: (0..levels - 1)
                .map(|l| {
                    nn::linear(
                        vs / "up_proj" / l,
                        widths[l + 1],
                        widths[l],
                        Default::default(),
                    )
                })
                .collect(),
            merge: (0..levels)
                .map(|l| {
                    (0..config.blocks_per_level)
                        .map(|b| {
                            nn::linear(
                                vs / "merge" / l / b,
                                2 * widths[l],
                                widths[l],
                                Default::default(),
                            )
                        })
                        .collect()
                })
                .collect(),
            up: (0..levels).map(|l| blocks("up", l)).collect(),
            out_norm: config
                .output_norm
                .then(|| nn::layer_norm(vs / "out_norm", vec![widths[0]], Default::default())),
            output: zero_linear(vs / "output", widths[0], dim),
        }
    }

    /// F(w_t, t, e): w_t [B, D], t [B] int64, e [B, E] → [B, D].
    pub fn forward(&self, w_t: &Tensor, t: &Tensor, e: &Tensor) -> Tensor {
        let c = self.time.condition(t, e);
        let mut h = self.input.forward(w_t);
        let mut skips = Vec::new();
        let levels = self.down.len();
        for level in 0..levels {
            for block in &self.down[level] {
                h = block.forward(&h, &c);
                skips.push(h.shallow_clone());
            }
            if level + 1 < levels {
                h = self.down_proj[level].forward(&h);
            }
        }
        h = self.middle.forward(&h, &c);
        for level in (0..levels).rev() {
            if level + 1 < levels {
                h = self.up_proj[level].forward(&h);
            }
            for (block, merge) in self.up[level].iter().zip(&self.merge[level]) {
                let skip = skips.pop().expect("one skip per down block");
                h = merge.forward(&Tensor::cat(&[h, skip], 1));
                h = block.forward(&h, &c);
            }
        }
        match &self.out_norm {
            Some(norm) => self.output.forward(&norm.forward(&h)),
            None => self.output.forward(&h),
        }
    }
}
