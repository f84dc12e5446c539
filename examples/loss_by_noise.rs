//! Where a denoiser's loss comes from: its ε-loss on a zoo's weights at
//! fixed noise levels t, for several denoisers side by side (issue 21: the
//! layer transformer's mean loss is lower than the MLP U-Net's, yet its
//! samples are noise). The condition is dropped (the network's
//! unconditional branch, trained by condition dropout), the same noise is
//! drawn for every denoiser, and every zoo model is used (training rows
//! mostly: a diagnostic, not a held-out figure). Prints a Markdown table.
//!
//! `cargo run --release --example loss_by_noise -- DATA_DIR ZOO DENOISER_ID…`

use tch::{Device, Kind, Tensor};
use weightgen::diffusion::SeededNoise;
use weightgen::eval::{load_denoiser, load_zoo};
use weightgen::model::TaskBatch;
use weightgen::storage::StorageArgs;

/// The noise levels reported, out of T = 1000.
const LEVELS: [i64; 9] = [5, 25, 50, 100, 200, 400, 600, 800, 950];

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tch::set_num_threads(2);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, zoo, ids @ ..] = args.as_slice() else {
        anyhow::bail!("usage: loss_by_noise DATA_DIR ZOO DENOISER_ID…");
    };
    let (catalog, blobs) = StorageArgs::embedded(dir).open().await?;
    let data = load_zoo(&catalog, &blobs, zoo).await?;
    let mut columns = Vec::new();
    for id in ids {
        let (checkpoint, _) = load_denoiser(&catalog, &blobs, &data, Some(id), Device::Cpu).await?;
        let w0 = checkpoint
            .stats
            .normalize(&data.weights)
            .to_kind(Kind::Float);
        let (n, d) = (w0.size()[0], w0.size()[1]);
        let eps = SeededNoise::new(&[5], 9)
            .draw(&[n, d], Device::Cpu)
            .squeeze_dim(0);
        let losses: Vec<f64> = LEVELS
            .iter()
            .map(|&t| {
                let tt = Tensor::full([n], t, (Kind::Int64, Device::Cpu));
                tch::no_grad(|| {
                    checkpoint
                        .model
                        .loss(&w0, &TaskBatch::unconditional(), &tt, &eps, None)
                        .double_value(&[])
                })
            })
            .collect();
        columns.push(losses);
    }
    println!("| t | {} |", ids.join(" | "));
    println!("|---|{}", "---|".repeat(ids.len()));
    for (row, t) in LEVELS.iter().enumerate() {
        let cells: Vec<String> = columns.iter().map(|c| format!("{:.4}", c[row])).collect();
        println!("| {t} | {} |", cells.join(" | "));
    }
    Ok(())
}
