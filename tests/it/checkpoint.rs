//! The denoiser checkpoint: one safetensors file that round-trips the model,
//! statistics, latent and clip range exactly, loads onto CPU or the first
//! CUDA device (when present), and refuses files that do not fit.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};
use weightgen::diffusion::{
    Denoiser, RecommendedSampler, RecommendedSampling, SamplerKind, SamplingConfig, SeededNoise,
    sample,
};
use weightgen::model::checkpoint::SAMPLING_STREAM;
use weightgen::model::{
    AutoencoderFit, ConditionalDenoiser, DenoiserCheckpoint, DenoiserConfig, Latent,
    LayerTransformerConfig, NetConfig, TaskBatch, TaskEncoderConfig, TokenLayout,
    WeightAutoencoder,
};
use weightgen::tasks::{FeatureSchema, FeatureSpec};
use weightgen::weights::{
    ArchSpec, DEFAULT_STD_FLOOR, PcaLatent, Stats, StatsMode, ZooReference, decode_tensors,
    encode_tensors,
};

fn checkpoint(net: NetConfig) -> DenoiserCheckpoint {
    checkpoint_in(net, |standardized| {
        Some(Latent::Pca(PcaLatent::fit(standardized, 12, 0)))
    })
}

/// A checkpoint whose denoiser diffuses in an autoencoder latent (briefly
/// trained, so that its weights are not the PCA it starts from).
fn autoencoder_checkpoint() -> DenoiserCheckpoint {
    checkpoint_in(NetConfig::MlpUnet(Default::default()), |standardized| {
        let fit = AutoencoderFit {
            steps: 30,
            ..Default::default()
        };
        Some(Latent::Autoencoder(Box::new(WeightAutoencoder::fit(
            standardized,
            None,
            12,
            32,
            &fit,
        ))))
    })
}

/// A checkpoint of `net` in the latent `fit_latent` fits (None: in weight
/// space, standardized as the trainer standardizes for `net`).
fn checkpoint_in(
    net: NetConfig,
    fit_latent: impl Fn(&Tensor) -> Option<Latent>,
) -> DenoiserCheckpoint {
    let arch = ArchSpec::sequential_mlp("mlp-8-4-3", "test", &[8, 4, 3]).unwrap();
    let d = arch.num_parameters() as i64;
    let zoo = Tensor::randn([40, d], (Kind::Float, Device::Cpu));
    let mode = match &net {
        NetConfig::LayerTransformer(c) if c.tokens == TokenLayout::Units => StatsMode::PerUnitSlot,
        _ => StatsMode::PerDimension,
    };
    let stats = Stats::fit(&zoo, mode, &arch, DEFAULT_STD_FLOOR);
    let latent = fit_latent(&stats.normalize(&zoo).to_kind(Kind::Float));
    let encoder = TaskEncoderConfig {
        feature_dim: 3,
        support_x_dim: 8,
        support_y_dim: 3,
        hidden: 16,
        embed_dim: 8,
        prototypes: false,
    };
    let mut config = DenoiserConfig::new(latent.as_ref().map_or(d, Latent::dim), encoder);
    config.net = net;
    if latent.is_none() {
        config = config.with_layout(&arch);
    }
    let model = ConditionalDenoiser::new(config, Device::Cpu).unwrap();
    // Move every variable off its initial value so the round trip is tested on real numbers.
    tch::no_grad(|| {
        for (_, mut v) in model.vs.variables() {
            let noise = Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.1;
            v.copy_(&(&v + noise));
        }
    });
    let normalized = stats.normalize(&zoo);
    let encoded = latent
        .as_ref()
        .map_or(normalized.shallow_clone(), |l| l.encode(&normalized));
    DenoiserCheckpoint {
        model,
        arch,
        stats,
        clip: Some((
            encoded.amin([0].as_slice(), false),
            encoded.amax([0].as_slice(), false),
        )),
        latent,
        feature_schema: FeatureSchema {
            features: vec![FeatureSpec {
                name: "class_ids".into(),
                description: String::new(),
                length: 3,
                min: 0.0,
                max: 9.0,
                required: true,
            }],
            embedding_dim: 0,
            support: None,
        },
        feature_norm: Some((
            Tensor::from_slice(&[0.5f32, 1.0, 2.0]),
            Tensor::from_slice(&[1.0f32, 2.0, 3.0]),
        )),
        summary: BTreeMap::from([("val_loss".to_owned(), 0.25)]),
        zoo_reference: ZooReference::fit(&zoo, 1 << 20, 0.95),
        recommended: Some(RecommendedSampling {
            sampler: RecommendedSampler::DpmSolver,
            steps: 1,
            guidance: 1.0,
        }),
        union: None,
    }
}

fn condition(device: Device) -> TaskBatch {
    TaskBatch {
        features: Some(Tensor::ones([2, 3], (Kind::Float, device))),
        support_x: Some(Tensor::ones([2, 5, 8], (Kind::Float, device)) * 0.5),
        support_y: Some(Tensor::zeros([2, 5, 3], (Kind::Float, device))),
        features_dropped: None,
        support_dropped: None,
        arch_descriptor: None,
        arch_mask: None,
    }
}

fn output(ckpt: &DenoiserCheckpoint, device: Device) -> Tensor {
    let d = ckpt.model.config().dim;
    let w = Tensor::linspace(-1.0, 1.0, 2 * d, (Kind::Float, device)).reshape([2, d]);
    let t = Tensor::from_slice(&[3i64, 700]).to_device(device);
    tch::no_grad(|| ckpt.model.forward(&w, &t, &condition(device), false)).to_device(Device::Cpu)
}

#[test]
fn checkpoints_round_trip_exactly_for_both_networks() {
    let device = Device::cuda_if_available();
    for net in [
        NetConfig::MlpUnet(Default::default()),
        NetConfig::LayerTransformer(LayerTransformerConfig {
            token_size: 4,
            hidden: 32,
            depth: 2,
            heads: 2,
            time_dim: 16,
            condition_tokens: 2,
            // 3 tokens in windows of 2: the second window is padded.
            window: 2,
            tokens: TokenLayout::Chunks,
        }),
    ] {
        round_trips_exactly(checkpoint(net), device);
    }
    // In weight space, one token per hidden unit.
    let units = NetConfig::LayerTransformer(LayerTransformerConfig {
        hidden: 32,
        depth: 2,
        heads: 2,
        time_dim: 16,
        condition_tokens: 2,
        window: 0,
        tokens: TokenLayout::Units,
        ..Default::default()
    });
    let original = checkpoint_in(units, |_| None);
    assert_eq!(original.model.config().units.len(), 1);
    round_trips_exactly(original, device);
}

fn round_trips_exactly(mut original: DenoiserCheckpoint, device: Device) {
    {
        let bytes = original.to_bytes().unwrap();
        // Loading prepares the network for sampling (equal to the trainer's
        // forward up to rounding; a unit test checks that): prepare the
        // original too, so the outputs can be compared bit for bit.
        original.model.prepare_for_sampling();
        let loaded = DenoiserCheckpoint::from_bytes(&bytes, device).unwrap();
        assert_eq!(loaded.model.device(), device);
        assert_eq!(loaded.model.config(), original.model.config());
        assert_eq!(loaded.arch, original.arch);
        assert_eq!(loaded.feature_schema, original.feature_schema);
        assert_eq!(loaded.summary, original.summary);
        assert_eq!(loaded.recommended, original.recommended);
        assert!(
            loaded.stats.mean.equal(&original.stats.mean)
                && loaded.stats.std.equal(&original.stats.std)
        );
        let (lf, of) = (
            loaded.feature_norm.as_ref().unwrap(),
            original.feature_norm.as_ref().unwrap(),
        );
        assert!(
            lf.0.to_device(Device::Cpu).equal(&of.0) && lf.1.to_device(Device::Cpu).equal(&of.1)
        );
        match (&loaded.latent, &original.latent) {
            (Some(Latent::Pca(l)), Some(Latent::Pca(o))) => {
                assert!(l.components.to_device(Device::Cpu).equal(&o.components));
                assert_eq!(l.explained, o.explained);
            }
            (None, None) => {}
            _ => panic!("a PCA latent stays one, and weight space stays weight space"),
        }
        let (l, o) = (
            loaded.zoo_reference.as_ref().unwrap(),
            original.zoo_reference.as_ref().unwrap(),
        );
        assert_eq!(l.spread, o.spread);
        assert!(l.weights.to_device(Device::Cpu).equal(&o.weights) && l.len() == 40);
        let (a, b) = (output(&original, Device::Cpu), output(&loaded, device));
        if device == Device::Cpu {
            assert!(a.equal(&b), "same outputs after reload");
        } else {
            assert!(a.allclose(&b, 1e-4, 1e-4, false), "CUDA outputs match CPU");
        }
        // Writing the loaded checkpoint again gives the same bytes.
        assert_eq!(loaded.to_bytes().unwrap(), bytes);
    }
}

#[test]
fn an_autoencoder_latent_round_trips_and_decodes_what_it_generates() {
    let device = Device::cuda_if_available();
    let original = autoencoder_checkpoint();
    let bytes = original.to_bytes().unwrap();
    let loaded = DenoiserCheckpoint::from_bytes(&bytes, device).unwrap();
    let (Some(Latent::Autoencoder(l)), Some(Latent::Autoencoder(o))) =
        (&loaded.latent, &original.latent)
    else {
        panic!("an autoencoder latent stays one");
    };
    assert_eq!(l.config, o.config);
    assert_eq!(loaded.latent.as_ref().unwrap().space(), "autoencoder");
    let z = Tensor::linspace(-2.0, 2.0, 24, (Kind::Float, Device::Cpu)).reshape([2, 12]);
    let (a, b) = tch::no_grad(|| (o.decode(&z), l.decode(&z).to_device(Device::Cpu)));
    assert!(
        a.allclose(&b, 1e-5, 1e-5, false),
        "same decoder after reload"
    );
    assert_eq!(loaded.to_bytes().unwrap(), bytes);
    // Generation decodes through it: by hand, the same weights.
    generation_decodes_the_latent(&original);
    // A checkpoint missing one of its tensors is refused by name.
    let err = refusal_without(&bytes, "latent_ae.decoder.out.weight");
    assert!(err.contains("missing decoder.out.weight"), "{err}");
}

/// Why the checkpoint `bytes` is refused once its tensor `name` is taken out.
fn refusal_without(bytes: &[u8], name: &str) -> String {
    let (tensors, meta) = decode_tensors(bytes).unwrap();
    let mut without_one: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(n, _)| n.as_str() != name)
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    without_one.sort_by(|a, b| a.0.cmp(&b.0));
    DenoiserCheckpoint::from_bytes(&encode_tensors(&without_one, &meta).unwrap(), Device::Cpu)
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn generate_is_sampling_then_latent_decode_then_denormalization() {
    generation_decodes_the_latent(&checkpoint(NetConfig::MlpUnet(Default::default())));
}

fn generation_decodes_the_latent(ckpt: &DenoiserCheckpoint) {
    let seeds = [4u64, 9];
    let kind = SamplerKind::ddim(10, 0.0);
    let generated = ckpt.generate(&condition(Device::Cpu), &seeds, kind, 2.0);
    // The same steps by hand, with the encoder run at every step.
    let z = sample(
        &ckpt.model,
        ckpt.model.schedule(),
        &condition(Device::Cpu),
        ckpt.model.config().dim,
        &mut SeededNoise::new(&seeds, SAMPLING_STREAM),
        &SamplingConfig {
            kind,
            guidance_scale: 2.0,
            clip_x0: ckpt.clip_range(),
        },
        Device::Cpu,
    );
    let by_hand = ckpt
        .stats
        .denormalize(&ckpt.latent.as_ref().unwrap().decode(&z));
    assert_eq!(generated.size(), [2, ckpt.arch.num_parameters() as i64]);
    assert!(
        generated.equal(&by_hand),
        "pre-embedded conditions change nothing"
    );
}

#[test]
fn files_that_do_not_fit_are_refused_with_a_reason() {
    let original = checkpoint(NetConfig::MlpUnet(Default::default()));
    let bytes = original.to_bytes().unwrap();
    assert!(DenoiserCheckpoint::from_bytes(&bytes[..bytes.len() / 2], Device::Cpu).is_err());

    let err = refusal_without(&bytes, "model.net.input.weight");
    assert!(err.contains("missing model.net.input.weight"), "{err}");

    let (tensors, meta) = decode_tensors(&bytes).unwrap();

    let mut unusable = meta.clone();
    unusable.insert(
        "recommended_sampling".into(),
        r#"{"sampler": "ddim", "steps": 0, "guidance": 3.0}"#.into(),
    );
    let all: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let err =
        DenoiserCheckpoint::from_bytes(&encode_tensors(&all, &unusable).unwrap(), Device::Cpu)
            .err()
            .unwrap();
    assert!(err.to_string().contains("recommended_sampling"), "{err}");

    let mut wrong_format = meta.clone();
    wrong_format.insert("format".into(), "something-else".into());
    let err =
        DenoiserCheckpoint::from_bytes(&encode_tensors(&all, &wrong_format).unwrap(), Device::Cpu)
            .err()
            .unwrap();
    assert!(err.to_string().contains("format"), "{err}");
}

/// A checkpoint of two MLP widths and a CNN in one union, loaded for the
/// first: it round-trips, generates each member at its own size (and the
/// member's weights are the union sample's coordinates), an unseen width
/// that fits, and refuses one that does not, by name.
#[test]
fn a_checkpoint_of_several_architectures_generates_each_and_an_unseen_width() {
    use weightgen::model::UnionMembership;
    use weightgen::weights::ArchUnion;
    let mlp =
        |h: usize| ArchSpec::sequential_mlp(format!("mlp-8-{h}-3"), "test", &[8, h, 3]).unwrap();
    let cnn = weightgen::tasks::nets::Network::small_cnn("cnn", "test", 2, 3, 3)
        .unwrap()
        .spec;
    let members = vec![mlp(4), mlp(6), cnn.clone()];
    let union = ArchUnion::new(&members).unwrap();
    let d = union.dim() as i64;
    let mut config = DenoiserConfig::new(d, condition_encoder());
    config.architecture_dim = union.descriptor_len() as i64;
    let model = ConditionalDenoiser::new(config, Device::Cpu).unwrap();
    tch::no_grad(|| {
        for (_, mut v) in model.vs.variables() {
            let noise = Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.1;
            v.copy_(&(&v + noise));
        }
    });
    let zoo = Tensor::randn([20, d], (Kind::Double, Device::Cpu));
    let mut original = DenoiserCheckpoint {
        model,
        arch: members[0].clone(),
        stats: Stats {
            mean: zoo.mean_dim(0, false, Kind::Double),
            std: zoo.std_dim(0, false, false),
            mode: StatsMode::PerDimension,
            floor: DEFAULT_STD_FLOOR,
        },
        latent: None,
        clip: None,
        feature_schema: FeatureSchema::default(),
        feature_norm: None,
        summary: BTreeMap::new(),
        zoo_reference: None,
        recommended: None,
        union: Some(UnionMembership {
            references: members
                .iter()
                .map(|m| {
                    let w =
                        Tensor::randn([5, m.num_parameters() as i64], (Kind::Float, Device::Cpu));
                    ZooReference::fit(&w, 1 << 20, 0.95)
                })
                .collect(),
            union: union.clone(),
            indices: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
        }),
    };
    original.select_architecture(&members[0]).unwrap();
    let bytes = original.to_bytes().unwrap();
    // As loading does (see the first test).
    original.model.prepare_for_sampling();
    let mut loaded = DenoiserCheckpoint::from_bytes(&bytes, Device::Cpu).unwrap();
    assert_eq!(loaded.arch, members[0]);
    assert_eq!(loaded.model.config(), original.model.config());
    let seeds = [1u64, 2];
    let generate = |c: &DenoiserCheckpoint| {
        c.generate(
            &c.condition(
                Some(&Tensor::ones([2, 3], (Kind::Float, Device::Cpu))),
                None,
            ),
            &seeds,
            SamplerKind::ddim(3, 0.0),
            2.0,
        )
    };
    for member in &members {
        loaded.select_architecture(member).unwrap();
        assert_eq!(&loaded.arch, member);
        let weights = generate(&loaded);
        assert_eq!(weights.size(), vec![2, member.num_parameters() as i64]);
        assert!(bool::try_from(weights.isfinite().all()).unwrap());
        // Its own zoo reference guards it.
        assert_eq!(
            loaded.zoo_reference.as_ref().map(|r| r.weights.size()[1]),
            Some(member.num_parameters() as i64)
        );
    }
    // The CNN is the union's last block: its weights are the union
    // sample's last coordinates, and the same seeds give the same values
    // as the round-tripped original.
    original.select_architecture(&cnn).unwrap();
    assert!(generate(&original).allclose(&generate(&loaded), 1e-5, 1e-6, false));
    // Its standardization is the union's at its places (what the
    // harness's baselines standardize its zoo with).
    let cnn_stats = loaded.arch_stats();
    let d_cnn = cnn.num_parameters() as i64;
    assert_eq!(cnn_stats.mean.size(), vec![d_cnn]);
    assert!(
        cnn_stats
            .std
            .equal(&loaded.stats.std.narrow(0, d - d_cnn, d_cnn))
    );
    // An unseen width in between: generated at its size, unguarded.
    loaded.select_architecture(&mlp(5)).unwrap();
    assert_eq!(
        generate(&loaded).size(),
        vec![2, mlp(5).num_parameters() as i64]
    );
    assert!(loaded.zoo_reference.is_none());
    // Wider than any member, or another structure: refused by name.
    let wide = loaded.select_architecture(&mlp(7)).unwrap_err().to_string();
    assert!(
        wide.contains("mlp-8-7-3") && wide.contains("larger"),
        "{wide}"
    );
    let deep = ArchSpec::sequential_mlp("deep", "test", &[8, 4, 4, 3]).unwrap();
    assert!(loaded.select_architecture(&deep).is_err());
}

fn condition_encoder() -> TaskEncoderConfig {
    TaskEncoderConfig {
        feature_dim: 3,
        support_x_dim: 0,
        support_y_dim: 0,
        hidden: 16,
        embed_dim: 8,
        prototypes: false,
    }
}
