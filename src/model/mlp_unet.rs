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
    sampling: Option<SamplingTables>,
}

/// What a frozen network computes once for sampling (`MlpUnet::prepare_for_sampling`).
#[derive(Debug)]
struct SamplingTables {
    /// MLP(τ(t)) for every t in 0..=T, [T + 1, time_dim].
    time: Tensor,
    /// Every FiLM block's projection stacked, in forward order; None for
    /// Concat.
    film: Option<StackedFilm>,
}

/// The FiLM projections of all blocks as one matrix product.
#[derive(Debug)]
struct StackedFilm {
    /// Weightᵀ [c_dim, Σ 2 × width].
    weight: Tensor,
    /// Bias [Σ 2 × width], with the 1 of 1 + γ folded in.
    bias: Tensor,
    /// Column widths of the product: each block's scale, then its shift.
    widths: Vec<i64>,
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
            sampling: None,
        }
    }

    /// The blocks in the order `forward` runs them.
    fn blocks_in_order(&self) -> impl Iterator<Item = &FilmBlock> {
        self.down
            .iter()
            .flatten()
            .chain(std::iter::once(&self.middle))
            .chain(self.up.iter().rev().flatten())
    }

    /// Whether `prepare_for_sampling` ran.
    pub fn is_prepared_for_sampling(&self) -> bool {
        self.sampling.is_some()
    }

    /// Freezes the network for sampling at timesteps 0 … `timesteps` − 1
    /// (T + 1 of them for a schedule of T steps: t runs from T to 0):
    /// MLP(τ(t)) becomes a table lookup and every block's FiLM projection one
    /// stacked matrix product per pass (a pass of the demo's latent
    /// denoiser ran ≈ 60 small kernels, each dispatch-bound on a CPU;
    /// docs/BENCHMARKS.md). The outputs equal `forward`'s up to float
    /// rounding. Call again after the variables change; training never
    /// calls it.
    pub fn prepare_for_sampling(&mut self, timesteps: i64) {
        let time = self.time.table(timesteps);
        let films: Option<Vec<(Tensor, Tensor)>> = self
            .blocks_in_order()
            .map(FilmBlock::film_for_sampling)
            .collect();
        let film = films.map(|films| {
            let (weights, biases): (Vec<Tensor>, Vec<Tensor>) = films.into_iter().unzip();
            let widths = biases.iter().flat_map(|b| [b.size()[0] / 2; 2]).collect();
            StackedFilm {
                weight: Tensor::cat(&weights, 1),
                bias: Tensor::cat(&biases, 0),
                widths,
            }
        });
        self.sampling = Some(SamplingTables { time, film });
    }

    /// F(w_t, t, e): w_t [B, D], t [B] int64, e [B, E] → [B, D].
    pub fn forward(&self, w_t: &Tensor, t: &Tensor, e: &Tensor) -> Tensor {
        let c = match &self.sampling {
            Some(tables) => TimeCondition::condition_from_table(&tables.time, t, e),
            None => self.time.condition(t, e),
        };
        let Some(film) = self
            .sampling
            .as_ref()
            .and_then(|tables| tables.film.as_ref())
        else {
            return self.run(w_t, |block, h| block.forward(h, &c));
        };
        let modulation = film
            .bias
            .addmm(&c, &film.weight)
            .split_with_sizes(&film.widths, 1);
        let mut parts = modulation.chunks_exact(2);
        self.run(w_t, |block, h| match parts.next() {
            Some([scale, shift]) => block.forward_modulated(h, scale, shift),
            _ => block.forward(h, &c),
        })
    }

    /// The U-Net around `block_fn(block, h)`, called for each block in
    /// `blocks_in_order`'s order.
    fn run(&self, w_t: &Tensor, mut block_fn: impl FnMut(&FilmBlock, &Tensor) -> Tensor) -> Tensor {
        let mut h = self.input.forward(w_t);
        let mut skips = Vec::new();
        let levels = self.down.len();
        for level in 0..levels {
            for block in &self.down[level] {
                h = block_fn(block, &h);
                skips.push(h.shallow_clone());
            }
            if level + 1 < levels {
                h = self.down_proj[level].forward(&h);
            }
        }
        h = block_fn(&self.middle, &h);
        for level in (0..levels).rev() {
            if level + 1 < levels {
                h = self.up_proj[level].forward(&h);
            }
            for (block, merge) in self.up[level].iter().zip(&self.merge[level]) {
                let skip = skips.pop().expect("one skip per down block");
                h = merge.forward(&Tensor::cat(&[h, skip], 1));
                h = block_fn(block, &h);
            }
        }
        match &self.out_norm {
            Some(norm) => self.output.forward(&norm.forward(&h)),
            None => self.output.forward(&h),
        }
    }
}
