//! What one denoiser pass costs by the rows in it, for the two denoiser
//! shapes the server runs most: the bench's raw-weight digits denoiser
//! (D = 2,245, MLP U-Net 256/128) and the demo's latent one (D = 64,
//! 128/64). The step-level batcher pads every pass to a multiple of 8 rows
//! (`backend::engine::ROW_QUANTUM`) so that a request's bytes do not depend
//! on its company; this shows what that costs a lone request.
//!
//! `cargo run --release --example pass_cost` (docs/BENCHMARKS.md).

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use weightgen::model::{
    ConditionalDenoiser, DenoiserConfig, MlpUnetConfig, NetConfig, TaskEncoderConfig,
};

const EMBED: i64 = 64;
const PASSES: u32 = 400;

fn main() {
    tch::set_num_threads(2);
    println!("| denoiser | rows | ms per pass | ms per row |");
    println!("|---|---|---|---|");
    for (dim, widths) in [(2245i64, vec![256i64, 128]), (64, vec![128, 64])] {
        let encoder = TaskEncoderConfig {
            feature_dim: 4,
            support_x_dim: 0,
            support_y_dim: 0,
            hidden: 64,
            embed_dim: EMBED,
            prototypes: false,
        };
        let mut config = DenoiserConfig::new(dim, encoder);
        config.net = NetConfig::MlpUnet(MlpUnetConfig {
            widths: widths.clone(),
            ..MlpUnetConfig::default()
        });
        let model = ConditionalDenoiser::new(config, Device::Cpu).expect("a denoiser");
        for rows in [1i64, 4, 8, 16, 64] {
            let x = Tensor::randn([rows, dim], (Kind::Float, Device::Cpu));
            let t = Tensor::full([rows], 500i64, (Kind::Int64, Device::Cpu));
            let e = Tensor::randn([rows, EMBED], (Kind::Float, Device::Cpu));
            let ms = tch::no_grad(|| {
                for _ in 0..50 {
                    let _ = model.output(&x, &t, &e);
                }
                let start = Instant::now();
                for _ in 0..PASSES {
                    let _ = model.output(&x, &t, &e);
                }
                start.elapsed().as_secs_f64() * 1e3 / f64::from(PASSES)
            });
            println!(
                "| D = {dim}, MLP U-Net {widths:?} | {rows} | {ms:.3} | {:.3} |",
                ms / rows as f64
            );
        }
    }
}
