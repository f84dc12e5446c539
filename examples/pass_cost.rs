//! Where a denoiser pass's time goes, by the rows in it, for the two
//! denoiser shapes the server runs most: the bench's raw-weight digits
//! denoiser (D = 2,245, MLP U-Net 256/128) and the demo's latent one
//! (D = 64, 128/64). For each row count it times
//!
//! - one pass (`ConditionalDenoiser::output`) as the trainer runs it, and
//!   as the server runs it: prepared for sampling (`prepare_for_sampling`,
//!   which loading a checkpoint does: the time MLP a table lookup, the FiLM
//!   projections one stacked product);
//! - a plain `mm` of every matrix product the prepared pass runs (each 2-D
//!   weight of the network, the task encoder's and the time MLP's aside,
//!   the FiLM projections stacked, at the same rows): the GEMM floor issue
//!   18 measures efficiency against;
//! - one DDIM step of `diffusion::sample` (the pass plus the sampler's
//!   update and bookkeeping), from DDIM-50's total, with the task
//!   embedding computed once ahead as the server does (`embed`,
//!   `with_embeddings`; until 2026-12-05 the step reran the task encoder).
//!
//! The prepared pass and the step run twice: with the fused CPU FiLM block
//! (`model::film_block`, what the server runs) and with it switched off.
//!
//! The step-level batcher pads every pass to a multiple of 8 rows
//! (`backend::engine::ROW_QUANTUM`) so that a request's bytes do not depend
//! on its company; the 1-row line shows what that costs a lone request.
//!
//! `cargo run --release --example pass_cost` (docs/BENCHMARKS.md).

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use weightgen::diffusion::{SamplerKind, SamplingConfig, SeededNoise, sample};
use weightgen::model::{
    ConditionalDenoiser, DenoiserConfig, MlpUnetConfig, NetConfig, TaskBatch, TaskEncoderConfig,
    film_block,
};

const EMBED: i64 = 64;
const FEATURES: i64 = 4;

/// Rounds each contender runs; the figure is its fastest.
const ROUNDS: usize = 15;

/// Per-call milliseconds of each contender: fastest of [`ROUNDS`] rounds of
/// `repeats` calls, the contenders taking turns within each round so that
/// they all meet the same neighbours on this shared machine.
fn race(repeats: &[u32], contenders: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    for (f, &n) in contenders.iter_mut().zip(repeats) {
        for _ in 0..n.min(20) {
            f();
        }
    }
    let mut best = vec![f64::INFINITY; contenders.len()];
    for _ in 0..ROUNDS {
        for ((f, &n), best) in contenders.iter_mut().zip(repeats).zip(&mut best) {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            *best = best.min(start.elapsed().as_secs_f64() * 1e3 / f64::from(n));
        }
    }
    best
}

fn denoiser(dim: i64, widths: &[i64]) -> ConditionalDenoiser {
    let encoder = TaskEncoderConfig {
        feature_dim: FEATURES,
        support_x_dim: 0,
        support_y_dim: 0,
        hidden: 64,
        embed_dim: EMBED,
        prototypes: false,
    };
    let mut config = DenoiserConfig::new(dim, encoder);
    config.net = NetConfig::MlpUnet(MlpUnetConfig {
        widths: widths.to_vec(),
        ..MlpUnetConfig::default()
    });
    ConditionalDenoiser::new(config, Device::Cpu).expect("a denoiser")
}

/// The matrix products a pass prepared for sampling runs, as [in, out]
/// weights: every 2-D weight outside the task encoder and the time MLP (a
/// table lookup), the FiLM projections stacked into one.
fn pass_products(model: &ConditionalDenoiser) -> Vec<Tensor> {
    let named: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(name, t)| {
            !name.starts_with("encoder") && !name.starts_with("net.time.") && t.dim() == 2
        })
        .map(|(name, t)| (name, t.detach().tr().contiguous()))
        .collect();
    let (films, rest): (Vec<_>, Vec<_>) = named
        .into_iter()
        .partition(|(name, _)| name.contains(".film."));
    let films: Vec<Tensor> = films.into_iter().map(|(_, t)| t).collect();
    let mut products: Vec<Tensor> = rest.into_iter().map(|(_, t)| t).collect();
    products.push(Tensor::cat(&films, 1));
    products
}

fn main() {
    tch::set_num_threads(2);
    println!(
        "| denoiser | rows | pass as trained (ms) | pass prepared, plain blocks (ms) | pass prepared, fused blocks (ms) | its GEMMs alone (ms) | GEMM share of the fused pass | DDIM step, plain / fused (ms) | GEMM ÷ step, plain / fused |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (dim, widths) in [(2245i64, vec![256i64, 128]), (64, vec![128, 64])] {
        let model = denoiser(dim, &widths);
        let mut prepared = denoiser(dim, &widths);
        prepared.vs.copy(&model.vs).expect("same variables");
        prepared.prepare_for_sampling();
        let weights = pass_products(&prepared);
        for rows in [1i64, 8, 16, 64, 128] {
            let x = Tensor::randn([rows, dim], (Kind::Float, Device::Cpu));
            let t = Tensor::full([rows], 500i64, (Kind::Int64, Device::Cpu));
            let e = Tensor::randn([rows, EMBED], (Kind::Float, Device::Cpu));
            let inputs: Vec<Tensor> = weights
                .iter()
                .map(|w| Tensor::randn([rows, w.size()[0]], (Kind::Float, Device::Cpu)))
                .collect();
            let repeats = (400 / rows).max(20) as u32;
            let features =
                TaskBatch::features(Tensor::ones([rows, FEATURES], (Kind::Float, Device::Cpu)));
            // The task encoder runs once per request, as the server runs it.
            let embedded = prepared.embed(&features, rows);
            let seeds: Vec<u64> = (0..rows as u64).collect();
            let config = SamplingConfig {
                kind: SamplerKind::ddim(50, 0.0),
                guidance_scale: 1.0,
                clip_x0: None,
            };
            let ddim50 = || {
                let _ = sample(
                    &prepared.with_embeddings(),
                    prepared.schedule(),
                    &embedded,
                    dim,
                    &mut SeededNoise::new(&seeds, 0),
                    &config,
                    Device::Cpu,
                );
            };
            let times = tch::no_grad(|| {
                race(
                    &[repeats, repeats, repeats, repeats, 1, 1],
                    &mut [
                        &mut || {
                            let _ = model.output(&x, &t, &e);
                        },
                        &mut || {
                            let _ = prepared.output(&x, &t, &e);
                        },
                        &mut || {
                            film_block::set_enabled(false);
                            let _ = prepared.output(&x, &t, &e);
                            film_block::set_enabled(true);
                        },
                        &mut || {
                            for (input, w) in inputs.iter().zip(&weights) {
                                let _ = input.mm(w);
                            }
                        },
                        &mut || ddim50(),
                        &mut || {
                            film_block::set_enabled(false);
                            ddim50();
                            film_block::set_enabled(true);
                        },
                    ],
                )
            });
            let (trained, pass, unfused, gemms) = (times[0], times[1], times[2], times[3]);
            let (step, unfused_step) = (times[4] / 50.0, times[5] / 50.0);
            println!(
                "| D = {dim}, MLP U-Net {widths:?} | {rows} | {trained:.3} | {unfused:.3} | {pass:.3} | {gemms:.3} | {:.0} % | {unfused_step:.3} / {step:.3} | {:.0} / **{:.0} %** |",
                100.0 * gemms / pass,
                100.0 * gemms / unfused_step,
                100.0 * gemms / step
            );
        }
    }
}
