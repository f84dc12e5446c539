//! Building blocks shared by the denoisers: the sinusoidal time embedding
//! τ(t) and the FiLM-conditioned residual MLP block.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Sinusoidal embedding τ(t) ∈ R^dim of integer timesteps t [B]
/// (Vaswani et al.; Ho et al.): [cos(t·f_i), sin(t·f_i)] with
/// f_i = 10000^(−i/(dim/2)).
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let device = t.device();
    let freqs =
        (Tensor::arange(half, (Kind::Float, device)) * (-(10_000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], 1)
}

/// Multi-head scaled dot-product attention of queries, keys and values
/// stacked as qkv [3, B, heads, N, head size]; returns [B, N, heads × head
/// size]. With `causal`, position i attends to positions ≤ i only.
pub fn attend(qkv: &Tensor, causal: bool) -> Tensor {
    sdpa(qkv, None, causal)
}

/// [`attend`] where each row's keys are limited by `mask` (true: attended),
/// broadcastable to [B, heads, n, n].
pub fn attend_masked(qkv: &Tensor, mask: Option<&Tensor>) -> Tensor {
    sdpa(qkv, mask, false)
}

fn sdpa(qkv: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
    let size = qkv.size();
    let (b, heads, n, head) = (size[1], size[2], size[3], size[4]);
    Tensor::scaled_dot_product_attention(
        &qkv.get(0),
        &qkv.get(1),
        &qkv.get(2),
        mask,
        0.0,
        causal,
        None,
        false,
    )
    .transpose(1, 2)
    .reshape([b, n, heads * head])
}

/// The conditioning vector of a block: c = SiLU([MLP(τ(t)), e]), with a
/// two-layer MLP over the sinusoidal time embedding.
#[derive(Debug)]
pub struct TimeCondition {
    dim: i64,
    first: nn::Linear,
    second: nn::Linear,
}

impl TimeCondition {
    /// τ of size `dim`, variables under `vs/time`.
    pub fn new(vs: &nn::Path, dim: i64) -> Self {
        Self {
            dim,
            first: nn::linear(vs / "time" / "0", dim, dim, Default::default()),
            second: nn::linear(vs / "time" / "1", dim, dim, Default::default()),
        }
    }

    /// c [B, dim + E] for timesteps t [B] and embeddings e [B, E].
    pub fn condition(&self, t: &Tensor, e: &Tensor) -> Tensor {
        Self::join(&self.time_mlp(t), e)
    }

    /// MLP(τ(t)) of every timestep 0 … `timesteps` − 1, [timesteps, dim]:
    /// what `condition_from_table` looks up instead of ten kernels a pass.
    pub fn table(&self, timesteps: i64) -> Tensor {
        let device = self.first.ws.device();
        tch::no_grad(|| self.time_mlp(&Tensor::arange(timesteps, (Kind::Int64, device))))
    }

    /// `condition` with MLP(τ(t)) read from `table`.
    pub fn condition_from_table(table: &Tensor, t: &Tensor, e: &Tensor) -> Tensor {
        Self::join(&table.index_select(0, t), e)
    }

    fn time_mlp(&self, t: &Tensor) -> Tensor {
        self.second
            .forward(&self.first.forward(&timestep_embedding(t, self.dim)).silu())
    }

    fn join(tau: &Tensor, e: &Tensor) -> Tensor {
        Tensor::cat(&[tau.shallow_clone(), e.shallow_clone()], 1).silu()
    }
}

/// A linear layer whose weights and bias start at zero (so a residual branch
/// or FiLM modulation starts as the identity).
pub fn zero_linear(path: nn::Path, input: i64, output: i64) -> nn::Linear {
    nn::linear(
        path,
        input,
        output,
        nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

/// How a block takes in the condition c.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Conditioning {
    /// FiLM: scale and shift of the normalized activations (the proposal).
    #[default]
    Film,
    /// c concatenated to the normalized activations before the MLP (the
    /// ablation baseline).
    Concat,
}

/// Residual block h ← h + MLP(FiLM(LayerNorm(h); c)), where
/// FiLM(x; c) = x ⊙ (1 + γ(c)) + β(c) and c carries τ(t) and e. (Pre-norm
/// form of the proposal's h ← LayerNorm(h); h ← h + MLP(h ⊙ FiLM(e, τ(t))).)
/// With `Conditioning::Concat` the MLP reads [LayerNorm(h), c] instead.
#[derive(Debug)]
pub struct FilmBlock {
    norm: nn::LayerNorm,
    film: Option<nn::Linear>,
    up: nn::Linear,
    down: nn::Linear,
}

impl FilmBlock {
    /// A FiLM block of `width` conditioned on a `cond_dim` vector.
    pub fn new(vs: &nn::Path, width: i64, cond_dim: i64) -> Self {
        Self::with_conditioning(vs, width, cond_dim, Conditioning::Film)
    }

    /// A block of `width` taking a `cond_dim` vector as `conditioning` says.
    pub fn with_conditioning(
        vs: &nn::Path,
        width: i64,
        cond_dim: i64,
        conditioning: Conditioning,
    ) -> Self {
        let (film, up_input) = match conditioning {
            Conditioning::Film => (Some(zero_linear(vs / "film", cond_dim, 2 * width)), width),
            Conditioning::Concat => (None, width + cond_dim),
        };
        Self {
            norm: nn::layer_norm(vs / "norm", vec![width], Default::default()),
            film,
            up: nn::linear(vs / "up", up_input, 2 * width, Default::default()),
            down: zero_linear(vs / "down", 2 * width, width),
        }
    }

    /// h [B, width], c [B, cond_dim].
    pub fn forward(&self, h: &Tensor, c: &Tensor) -> Tensor {
        let x = match &self.film {
            Some(film) => {
                let modulation = film.forward(c).chunk(2, 1);
                self.norm.forward(h) * (1.0 + &modulation[0]) + &modulation[1]
            }
            None => Tensor::cat(&[self.norm.forward(h), c.shallow_clone()], 1),
        };
        h + self.down.forward(&self.up.forward(&x).silu())
    }

    /// A FiLM block with its modulation computed ahead (`film_for_sampling`,
    /// stacked for all blocks): `scale` is 1 + γ(c), `shift` is β(c); the
    /// FiLM is one kernel where `forward` runs five (and SiLU in place: for
    /// sampling, never for training). Only for blocks `film_for_sampling`
    /// answered. On the CPU at sampling's rows the whole block is one call
    /// to the fused shim (`film_block`: four kernels where the plain block
    /// runs six).
    pub fn forward_modulated(&self, h: &Tensor, scale: &Tensor, shift: &Tensor) -> Tensor {
        super::film_block::film_block(h, &self.norm, scale, shift, &self.up, &self.down)
            .unwrap_or_else(|| self.forward_plain(h, scale, shift))
    }

    /// `forward_modulated` in ATen's kernels, one op at a time.
    pub(crate) fn forward_plain(&self, h: &Tensor, scale: &Tensor, shift: &Tensor) -> Tensor {
        let x = shift.addcmul(&self.norm.forward(h), scale);
        h + self.down.forward(&self.up.forward(&x).silu_())
    }

    /// The norm, up and down layers (for the fused block's tests).
    #[cfg(test)]
    pub(crate) fn parts(&self) -> (&nn::LayerNorm, &nn::Linear, &nn::Linear) {
        (&self.norm, &self.up, &self.down)
    }

    /// The FiLM projection as (weightᵀ [cond_dim, 2 × width], bias [2 ×
    /// width] with the 1 of 1 + γ folded into its first half), for stacking
    /// every block's projection into one matrix product; None for `Concat`.
    pub fn film_for_sampling(&self) -> Option<(Tensor, Tensor)> {
        let film = self.film.as_ref()?;
        let bias = match &film.bs {
            Some(bs) => bs.detach().copy(),
            None => Tensor::zeros([film.ws.size()[0]], (film.ws.kind(), film.ws.device())),
        };
        let width = bias.size()[0] / 2;
        let mut scale_half = bias.narrow(0, 0, width);
        let _ = scale_half.g_add_scalar_(1.0);
        Some((film.ws.detach().tr().contiguous(), bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn time_embedding_matches_the_formula() {
        let t = Tensor::from_slice(&[0i64, 7]);
        let e = timestep_embedding(&t, 8);
        assert_eq!(e.size(), [2, 8]);
        // t = 0: cos = 1, sin = 0.
        assert_eq!(
            e.get(0).narrow(0, 0, 4).sum(Kind::Float).double_value(&[]),
            4.0
        );
        let f1 = (-(10_000f64.ln()) / 4.0).exp();
        assert!((e.double_value(&[1, 5]) - (7.0 * f1).sin()).abs() < 1e-6);
    }

    #[test]
    fn a_fresh_film_block_is_the_identity() {
        let vs = nn::VarStore::new(Device::Cpu);
        let block = FilmBlock::new(&vs.root(), 6, 3);
        let h = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
        let c = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        assert!(block.forward(&h, &c).equal(&h));
        let concat = FilmBlock::with_conditioning(&vs.root(), 6, 3, Conditioning::Concat);
        assert!(concat.forward(&h, &c).equal(&h));
    }
}
