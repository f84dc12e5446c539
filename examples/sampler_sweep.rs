//! One published denoiser's zero-shot score on its zoo's validation tasks
//! under several samplers and guidance scales, for one request form: how the
//! sampler was chosen (docs/RESULTS.md, "the sampler").
//!
//! `cargo run --example sampler_sweep -- DATA_DIR ZOO DENOISER_ID` (the figures
//! in docs/RESULTS.md came from this debug build)
//! with `FORM=both|features|support` (default features) and
//! `SWEEP=kind:steps:eta:guidance,…` (kind `ddim`, `trailing`, `dpm` —
//! DPM-Solver++(2M), η ignored — or `ddpm`).
//! Each setting is scored twice (two seed sets) on the validation rows the
//! training gate uses (`val_fraction` 0.1). `SOUP=N` scores instead the
//! mean, in weight space, of N samples per task (N seed sets a round; 1,
//! the default, is one sample as served).

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use weightgen::diffusion::{DdimSpacing, SamplerKind};
use weightgen::eval::subject::load_subject;
use weightgen::storage::StorageArgs;
use weightgen::train::quality::score;

const DEFAULT_SWEEP: &str = "ddim:50:0:3,ddim:100:0:3,ddim:200:0:3,ddim:50:0.5:3,ddim:50:1:3,\
ddim:100:1:3,ddpm:0:0:3,ddim:50:0:2,ddim:50:0:4,trailing:50:0:3";

fn parse(setting: &str) -> anyhow::Result<(SamplerKind, f64)> {
    let parts: Vec<&str> = setting.split(':').collect();
    let [kind, steps, eta, guidance] = parts[..] else {
        anyhow::bail!("{setting:?}: expected kind:steps:eta:guidance");
    };
    let (steps, eta): (usize, f64) = (steps.parse()?, eta.parse()?);
    let kind = match kind {
        "ddpm" => SamplerKind::Ddpm,
        "ddim" => SamplerKind::ddim(steps, eta),
        "trailing" => SamplerKind::Ddim {
            steps,
            eta,
            spacing: DdimSpacing::Trailing,
        },
        "dpm" => SamplerKind::DpmSolver { steps },
        other => anyhow::bail!("{other:?}: expected ddim, trailing, dpm or ddpm"),
    };
    Ok((kind, guidance.parse()?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data_dir, zoo, denoiser] = &args[..] else {
        anyhow::bail!("usage: sampler_sweep DATA_DIR ZOO DENOISER_ID");
    };
    let (catalog, blobs) = StorageArgs::embedded(data_dir).open().await?;
    let subject = load_subject(&catalog, &blobs, zoo, Some(denoiser), Device::Cpu).await?;
    tch::set_num_threads(1);
    let form = std::env::var("FORM").unwrap_or_else(|_| "features".into());
    let (tasks, condition) = subject
        .validation_tasks(&form)
        .ok_or_else(|| anyhow::anyhow!("FORM={form:?}: expected both, features or support"))?;
    let sweep = std::env::var("SWEEP").unwrap_or_else(|_| DEFAULT_SWEEP.into());
    let soup: u64 = match std::env::var("SOUP") {
        Ok(n) => n.parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
            anyhow::anyhow!("SOUP={n:?}: expected a number of samples, at least 1")
        })?,
        Err(_) => 1,
    };
    for setting in sweep.split(',') {
        let (kind, guidance) = parse(setting)?;
        let started = Instant::now();
        let means: Vec<f64> = (0..2u64)
            .map(|round| {
                let samples: Vec<Tensor> = (0..soup)
                    .map(|copy| {
                        let set = round * soup + copy;
                        let seeds: Vec<u64> =
                            (0..tasks.len() as u64).map(|i| i + 1000 * set).collect();
                        subject
                            .checkpoint
                            .generate(&condition, &seeds, kind, guidance)
                            .to_device(Device::Cpu)
                    })
                    .collect();
                let weights = Tensor::stack(&samples, 0).mean_dim(0, false, Kind::Float);
                let total: f64 = tasks
                    .iter()
                    .enumerate()
                    .map(|(i, task)| score(&subject.data, task, &weights.get(i as i64)))
                    .sum();
                total / tasks.len() as f64
            })
            .collect();
        println!(
            "{setting:>18}  {form}: {:.4} ({:.4} / {:.4})  {:.1} s",
            (means[0] + means[1]) / 2.0,
            means[0],
            means[1],
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
