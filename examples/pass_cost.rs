//! Where a denoiser pass's time goes, by the rows in it, for the two
//! denoiser shapes the server runs most: the bench's raw-weight digits
//! denoiser (D = 2,245, MLP U-Net 256/128) and the demo's latent one
//! (D = 64, 128/64). For each row count it times
//!
//! - one pass (`ConditionalDenoiser::output`, the forward the server's
//!   step-level batcher runs);
//! - a plain `mm` of every matrix product in that pass (each 2-D weight of
//!   the network, the task encoder's aside, at the same rows): the GEMM
//!   floor issue 18 measures efficiency against;
//! - one DDIM step of `diffusion::sample` (the pass plus the sampler's
//!   update and bookkeeping), from DDIM-50's total.
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
};

const EMBED: i64 = 64;
const FEATURES: i64 = 4;

/// Fastest of five rounds of `repeats` calls, per call, in milliseconds.
fn per_call_ms(repeats: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..repeats.min(20) {
        f();
    }
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..repeats {
                f();
            }
            start.elapsed().as_secs_f64() * 1e3 / f64::from(repeats)
        })
        .fold(f64::INFINITY, f64::min)
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

fn main() {
    tch::set_num_threads(2);
    println!(
        "| denoiser | rows | pass (ms) | its GEMMs alone (ms) | GEMM share of the pass | DDIM step (ms) | pass share of the step |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (dim, widths) in [(2245i64, vec![256i64, 128]), (64, vec![128, 64])] {
        let model = denoiser(dim, &widths);
        // The network's matrix products: every 2-D weight outside the
        // task encoder, [out, in], used once per pass.
        let weights: Vec<Tensor> = model
            .vs
            .variables()
            .into_iter()
            .filter(|(name, t)| !name.starts_with("encoder") && t.dim() == 2)
            .map(|(_, t)| t.detach().tr().contiguous())
            .collect();
        for rows in [1i64, 8, 16, 64, 128] {
            let x = Tensor::randn([rows, dim], (Kind::Float, Device::Cpu));
            let t = Tensor::full([rows], 500i64, (Kind::Int64, Device::Cpu));
            let e = Tensor::randn([rows, EMBED], (Kind::Float, Device::Cpu));
            let inputs: Vec<Tensor> = weights
                .iter()
                .map(|w| Tensor::randn([rows, w.size()[0]], (Kind::Float, Device::Cpu)))
                .collect();
            let repeats = (400 / rows).max(20) as u32;
            let (pass, gemms) = tch::no_grad(|| {
                let pass = per_call_ms(repeats, || {
                    let _ = model.output(&x, &t, &e);
                });
                let gemms = per_call_ms(repeats, || {
                    for (input, w) in inputs.iter().zip(&weights) {
                        let _ = input.mm(w);
                    }
                });
                (pass, gemms)
            });
            let features =
                TaskBatch::features(Tensor::ones([rows, FEATURES], (Kind::Float, Device::Cpu)));
            let seeds: Vec<u64> = (0..rows as u64).collect();
            let config = SamplingConfig {
                kind: SamplerKind::ddim(50, 0.0),
                guidance_scale: 1.0,
                clip_x0: None,
            };
            let step = per_call_ms(1, || {
                let _ = sample(
                    &model,
                    model.schedule(),
                    &features,
                    dim,
                    &mut SeededNoise::new(&seeds, 0),
                    &config,
                    Device::Cpu,
                );
            }) / 50.0;
            println!(
                "| D = {dim}, MLP U-Net {widths:?} | {rows} | {pass:.3} | {gemms:.3} | {:.0} % | {step:.3} | {:.0} % |",
                100.0 * gemms / pass,
                100.0 * pass / step
            );
        }
    }
}
