//! The permutation-equivariant denoiser (issue 21, item 4): trained by the
//! pipeline on an unaligned zoo of independent inits, it standardizes and
//! clips every hidden unit alike, and the published network commutes with
//! permuting the units.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use weightgen::catalog::Catalog;
use weightgen::diffusion::Denoiser;
use weightgen::model::{
    DenoiserCheckpoint, FitConfig, LayerTransformerConfig, NetConfig, TokenLayout,
};
use weightgen::storage::StorageArgs;
use weightgen::train::{LatentChoice, TrainDenoiserConfig, train_denoiser};
use weightgen::weights::NeuronLayout;
use weightgen::zoo::{AlignChoice, LoadOptions, build_zoo};

fn max_gap(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_transformer_trained_on_an_unaligned_zoo_commutes_with_unit_permutations() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let (catalog, blobs): (Arc<dyn Catalog>, _) =
        StorageArgs::embedded(dir.path()).open().await.unwrap();
    let zoo = crate::common::digits_zoo("indep", 40, 30, 5, false);
    build_zoo(catalog.clone(), blobs.clone(), zoo, |_| {})
        .await
        .unwrap();
    let config = TrainDenoiserConfig {
        zoo: "indep".into(),
        also_zoos: Vec::new(),
        denoiser_id: "units".into(),
        architecture: None,
        net: NetConfig::LayerTransformer(LayerTransformerConfig {
            hidden: 32,
            depth: 1,
            heads: 2,
            time_dim: 32,
            condition_tokens: 2,
            window: 0,
            tokens: TokenLayout::Units,
            ..Default::default()
        }),
        timesteps: 100,
        schedule: weightgen::diffusion::schedule::ScheduleKind::cosine(),
        prediction: weightgen::diffusion::Prediction::V,
        latent: LatentChoice::None,
        latent_steps: weightgen::model::weight_autoencoder::DEFAULT_AE_STEPS,
        load: LoadOptions {
            align: AlignChoice::Never,
            max_models: None,
        },
        fit: FitConfig {
            steps: 60,
            batch_size: 16,
            learning_rate: 1e-3,
            ..Default::default()
        },
        ema_decay: 0.9,
        val_fraction: 0.1,
        encoder_hidden: 32,
        embed_dim: 32,
        log_every: 30,
        eval_tasks: 2,
        eval_guidance: 1.0,
        device: Device::Cpu,
        activate: false,
        checkpoint_every: 0,
        resume: false,
        cancel: Default::default(),
    };
    train_denoiser(catalog.clone(), blobs.clone(), config, |_, _, _| {})
        .await
        .unwrap();
    let record = catalog.denoiser("units").await.unwrap().unwrap();
    assert_eq!(record.config["denoiser"]["net"]["tokens"], "units");
    assert!(
        record.summary["quality.held_out.ddim_test_accuracy"].is_finite(),
        "the gate generated weights: {:?}",
        record.summary
    );
    let stored =
        DenoiserCheckpoint::from_bytes(&blobs.get(&record.sha256).await.unwrap(), Device::Cpu)
            .unwrap();
    let layout = NeuronLayout::new(&stored.arch).unwrap();
    assert!(layout.exact);
    assert_eq!(stored.model.config().units, layout.groups);
    // Every unit standardized and clipped alike: permuting the units moves
    // none of the statistics or bounds.
    let perm: Vec<usize> = (0..layout.groups[0].units).rev().collect();
    let (low, high) = stored.clip.as_ref().unwrap();
    for values in [&stored.stats.mean, &stored.stats.std, low, high] {
        assert_eq!(max_gap(&layout.permute(values, 0, &perm), values), 0.0);
    }
    // The trained network (task encoder, preconditioning, unit tokens)
    // commutes with the permutation for any input and task.
    let d = stored.model.config().dim;
    let w = Tensor::randn([2, d], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[5i64, 80]);
    let features = stored
        .feature_norm
        .as_ref()
        .unwrap()
        .0
        .unsqueeze(0)
        .repeat([2, 1])
        + 0.5;
    let condition = stored.condition(Some(&features), None);
    let output = |w: &Tensor| tch::no_grad(|| stored.model.forward(w, &t, &condition, false));
    let out = output(&w);
    assert!(out.abs().max().double_value(&[]) > 1e-3);
    let gap = max_gap(
        &output(&layout.permute(&w, 0, &perm)),
        &layout.permute(&out, 0, &perm),
    );
    assert!(gap < 1e-4, "{gap}");
}
