//! Engine benchmark: sampling throughput (DDIM-50, DDPM-1000) at batch 1
//! and 64 and training iterations/s at batch 64, for D = 2245 (the digits
//! MLP 64-32-5) and D = 100,000, next to the same computation in PyTorch
//! eager (benches/engine_torch.py) on the same machine in the same run.
//!
//! Run: `scripts/bench-engine.sh` (or, bootstrapped, `cargo bench --bench engine`).
//! `WEIGHTGEN_BENCH_QUICK=1` measures D = 2245 only;
//! `WEIGHTGEN_BENCH_ONLY=text` only the measurements whose name contains it.

use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};
use weightgen::diffusion::{SamplerKind, SamplingConfig, SeededNoise, sample};
use weightgen::model::{
    ConditionalDenoiser, DenoiserConfig, FitConfig, TaskBatch, TaskEncoderConfig, Trainer,
};

/// Alternating Rust/PyTorch rounds per measurement.
const ROUNDS: usize = 2;

/// One measurement.
struct Case {
    name: String,
    dim: i64,
    batch: i64,
    kind: &'static str,
    steps: usize,
    timesteps: usize,
    repeats: usize,
    iterations: usize,
    /// Reported time = measured × scale (DDPM-1000 at large D is timed over
    /// a 50-step schedule: the per-step work does not depend on T).
    scale: f64,
}

fn cases(quick: bool) -> Vec<Case> {
    let mut cases = Vec::new();
    let dims: &[i64] = if quick { &[2245] } else { &[2245, 100_000] };
    for &dim in dims {
        let large = dim > 10_000;
        for batch in [1, 64] {
            cases.push(Case {
                name: format!("DDIM-50, D={dim}, batch {batch}"),
                dim,
                batch,
                kind: "ddim",
                steps: 50,
                timesteps: 1000,
                repeats: if large { 2 } else { 5 },
                iterations: 0,
                scale: 1.0,
            });
            cases.push(Case {
                name: format!("DDPM-1000, D={dim}, batch {batch}"),
                dim,
                batch,
                kind: "ddpm",
                steps: 0,
                timesteps: if large { 50 } else { 1000 },
                repeats: 2,
                iterations: 0,
                scale: if large { 20.0 } else { 1.0 },
            });
        }
        cases.push(Case {
            name: format!("noise draw, D={dim}, batch 64"),
            dim,
            batch: 64,
            kind: "noise",
            steps: 0,
            timesteps: 1000,
            repeats: 5,
            iterations: 0,
            scale: 1.0,
        });
        cases.push(Case {
            name: format!("train step (Adam, clip, EMA), D={dim}, batch 64"),
            dim,
            batch: 64,
            kind: "train",
            steps: 0,
            timesteps: 1000,
            repeats: 3,
            iterations: if large { 4 } else { 20 },
            scale: 1.0,
        });
    }
    cases
}

fn model(dim: i64, timesteps: usize) -> ConditionalDenoiser {
    let encoder = TaskEncoderConfig {
        feature_dim: 5,
        support_x_dim: 0,
        support_y_dim: 0,
        hidden: 64,
        embed_dim: 32,
        prototypes: false,
    };
    let mut config = DenoiserConfig::new(dim, encoder);
    config.timesteps = timesteps;
    ConditionalDenoiser::new(config, Device::Cpu).expect("valid config")
}

/// Fastest of `repeats` runs after one warm-up (the least disturbed by
/// whatever else the machine does).
fn timed(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn rust_seconds(case: &Case) -> f64 {
    let m = model(case.dim, case.timesteps);
    let features = TaskBatch::features(Tensor::ones([case.batch, 5], (Kind::Float, Device::Cpu)));
    let seeds: Vec<u64> = (0..case.batch as u64).collect();
    let run = |kind: SamplerKind, m: &ConditionalDenoiser| {
        let config = SamplingConfig {
            kind,
            guidance_scale: 1.0,
            clip_x0: None,
        };
        let _ = sample(
            m,
            m.schedule(),
            &features,
            case.dim,
            &mut SeededNoise::new(&seeds, 0),
            &config,
            Device::Cpu,
        );
    };
    match case.kind {
        "ddim" => timed(case.repeats, || run(SamplerKind::ddim(case.steps, 0.0), &m)),
        "ddpm" => timed(case.repeats, || run(SamplerKind::Ddpm, &m)),
        "noise" => {
            let mut noise = SeededNoise::new(&seeds, 0);
            timed(case.repeats, || {
                let _ = noise.draw(&[case.dim], Device::Cpu);
            })
        }
        _ => {
            // As in the PyTorch twin: one optimizer for all timed steps.
            let data = Tensor::randn([256, case.dim], (Kind::Float, Device::Cpu));
            let condition = TaskBatch::features(Tensor::ones([256, 5], (Kind::Float, Device::Cpu)));
            let config = FitConfig {
                batch_size: case.batch,
                ..Default::default()
            };
            // The worker's step: Adam with clipping, then the EMA update.
            let mut trainer = Trainer::new(&m, &config).expect("optimizer");
            let mut ema = weightgen::train::Ema::new(&m.vs, weightgen::train::DEFAULT_EMA_DECAY);
            timed(case.repeats, || {
                for _ in 0..case.iterations {
                    trainer.step(&m, &data, &condition);
                    ema.update(&m.vs);
                }
            }) / case.iterations as f64
        }
    }
}

fn torch_seconds(cases: &[Case]) -> Vec<f64> {
    let venv = std::env::var("WEIGHTGEN_TORCH_VENV")
        .expect("run through scripts/bench-engine.sh (needs the bootstrap venv)");
    let spec: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"name": c.name, "dim": c.dim, "batch": c.batch, "kind": c.kind, "steps": c.steps,
                   "timesteps": c.timesteps, "repeats": c.repeats, "iterations": c.iterations})
        })
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/engine_torch.py");
    let output = Command::new(format!("{venv}/bin/python"))
        .arg(script)
        .arg(Value::Array(spec).to_string())
        .output()
        .expect("run the PyTorch twin");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON line")["seconds"]
                .as_f64()
                .expect("seconds")
        })
        .collect()
}

fn main() {
    let quick = std::env::var_os("WEIGHTGEN_BENCH_QUICK").is_some();
    let only = std::env::var("WEIGHTGEN_BENCH_ONLY").unwrap_or_default();
    let cases: Vec<Case> = cases(quick)
        .into_iter()
        .filter(|c| c.name.contains(&only))
        .collect();
    println!("torch threads: {}", tch::get_num_threads());
    // Rust and PyTorch take turns on each case, ROUNDS times, and each keeps
    // its best: a slow spell of this shared machine then hits both sides
    // instead of whichever happened to run during it.
    let mut rust = vec![f64::INFINITY; cases.len()];
    let mut torch = vec![f64::INFINITY; cases.len()];
    for (i, case) in cases.iter().enumerate() {
        for round in 0..ROUNDS {
            let r = rust_seconds(case) * case.scale;
            let t = torch_seconds(std::slice::from_ref(case))[0] * case.scale;
            eprintln!(
                "round {round}  {:<32} rust {r:.4} s  torch {t:.4} s",
                case.name
            );
            rust[i] = rust[i].min(r);
            torch[i] = torch[i].min(t);
        }
    }
    println!(
        "| measurement | weightgen (Rust, tch) | PyTorch eager | ratio (Rust ÷ PyTorch throughput) |"
    );
    println!("|---|---|---|---|");
    for ((case, r), t) in cases.iter().zip(&rust).zip(&torch) {
        let (unit, rv, tv) = if case.kind == "train" {
            ("it/s", 1.0 / r, 1.0 / t)
        } else if case.kind == "noise" {
            let millions = (case.batch * case.dim) as f64 / 1e6;
            ("M normals/s", millions / r, millions / t)
        } else {
            ("samples/s", case.batch as f64 / r, case.batch as f64 / t)
        };
        let note = if case.scale != 1.0 {
            " (per-step time × 20)"
        } else {
            ""
        };
        println!(
            "| {}{note} | {rv:.3} {unit} | {tv:.3} {unit} | {:.2} |",
            case.name,
            rv / tv
        );
    }
}
