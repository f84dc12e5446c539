//! How a denoiser's memory and time grow with the length D of the vectors it
//! diffuses (issue 21), for both networks as the trainer builds them by
//! default: the MLP U-Net (512/256, whose first and last layers are D wide)
//! and the layer transformer (tokens of 64, H = 128, windows of 256 tokens).
//! The vectors are the raw weights of a synthetic MLP w-w-w (D ≈ 2w²), one
//! row, features-only condition.
//!
//! One configuration per process, so that the peak resident set is its own:
//!
//! `cargo run --release --example scale -- KIND D MODE [TRAIN_WINDOWS]`
//!
//! KIND: `mlp_unet` or `layer_transformer`; MODE: `sample` (DDIM-2 of one
//! row, the time per step) or `train` (Adam steps on a batch of 4, the time
//! of the second); TRAIN_WINDOWS: the transformer trains on that many random
//! windows per step. Prints one table row; `scripts/bench-scale.sh` runs the
//! grid of docs/BENCHMARKS.md.

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use weightgen::diffusion::{SamplerKind, SamplingConfig, SeededNoise, sample};
use weightgen::model::{
    ConditionalDenoiser, DenoiserConfig, FitConfig, LayerTransformerConfig, MlpUnetConfig,
    NetConfig, TaskBatch, TaskEncoderConfig, Trainer,
};
use weightgen::weights::ArchSpec;

const FEATURES: i64 = 4;
const BATCH: i64 = 4;

/// A process-wide figure of /proc/self/status, in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn denoiser(kind: &str, spec: &ArchSpec) -> ConditionalDenoiser {
    let encoder = TaskEncoderConfig {
        feature_dim: FEATURES,
        support_x_dim: 0,
        support_y_dim: 0,
        hidden: 64,
        embed_dim: 64,
        prototypes: false,
    };
    let mut config = DenoiserConfig::new(spec.num_parameters() as i64, encoder);
    config.net = match kind {
        "mlp_unet" => NetConfig::MlpUnet(MlpUnetConfig {
            widths: vec![512, 256],
            ..MlpUnetConfig::default()
        }),
        "layer_transformer" => NetConfig::LayerTransformer(LayerTransformerConfig::default()),
        other => panic!("unknown kind {other}: mlp_unet or layer_transformer"),
    };
    ConditionalDenoiser::new(config.with_layout(spec), Device::Cpu).expect("a denoiser")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, dim, mode, rest @ ..] = args.as_slice() else {
        panic!("usage: scale KIND D MODE [TRAIN_WINDOWS]");
    };
    let target: f64 = dim.parse().expect("D is a number");
    let train_windows: Option<usize> = rest.first().map(|n| n.parse().expect("a count"));
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let width = ((target / 2.0).sqrt().round() as usize).max(2);
    let spec = ArchSpec::sequential_mlp("synthetic", "", &[width, width, width]).unwrap();
    let d = spec.num_parameters() as i64;
    let before = status_mib("VmRSS");
    let model = denoiser(kind, &spec);
    let parameters: i64 = model
        .vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    let windows = model.window_count();
    let seconds = match mode.as_str() {
        "sample" => {
            let config = SamplingConfig {
                kind: SamplerKind::ddim(2, 0.0),
                guidance_scale: 1.0,
                clip_x0: None,
            };
            let condition =
                TaskBatch::features(Tensor::ones([1, FEATURES], (Kind::Float, Device::Cpu)));
            let start = Instant::now();
            let out = tch::no_grad(|| {
                sample(
                    &model,
                    model.schedule(),
                    &condition,
                    d,
                    &mut SeededNoise::new(&[1], 0),
                    &config,
                    Device::Cpu,
                )
            });
            assert_eq!(out.size(), [1, d]);
            start.elapsed().as_secs_f64() / 2.0
        }
        "train" => {
            let data = Tensor::randn([2 * BATCH, d], (Kind::Float, Device::Cpu));
            let condition = TaskBatch::features(Tensor::ones(
                [2 * BATCH, FEATURES],
                (Kind::Float, Device::Cpu),
            ));
            let config = FitConfig {
                steps: 2,
                batch_size: BATCH,
                learning_rate: 1e-4,
                train_windows,
                ..Default::default()
            };
            let mut trainer = Trainer::new(&model, &config).expect("a trainer");
            trainer.step(&model, &data, &condition);
            let start = Instant::now();
            let loss = trainer.step(&model, &data, &condition);
            assert!(loss.is_finite());
            start.elapsed().as_secs_f64()
        }
        other => panic!("unknown mode {other}: sample or train"),
    };
    let peak = status_mib("VmHWM");
    println!(
        "| {kind} | {d} | {mode}{} | {parameters} | {windows} | {:.0} | {seconds:.3} |",
        train_windows.map_or(String::new(), |n| format!(", {n} windows")),
        peak - before,
    );
}
