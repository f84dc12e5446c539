//! A small `words` zoo built by the zoo builder on an embedded catalog: the
//! base model trained once and stored as its own one-model zoo, LoRA
//! adapters of it trained from one shared init on zoo-side tasks, each file
//! PEFT-named with the adapter config and the base's SHA-256 in its
//! metadata, each adapter better than the base on its task's test words,
//! a denoiser of them served over gRPC whose adapters name their base (and
//! score the same in the Python example's plain PyTorch), and a second run
//! that finds everything built. Needs WEIGHTGEN_WORDS_DIR (scripts/test.sh
//! sources the bootstrap, which sets it).

use std::sync::Arc;
use std::time::Duration;

use tch::Device;
use weightgen::blobs::sha256_hex;
use weightgen::catalog::{Catalog, PageRequest, ZooModelFilter};
use weightgen::client::TaskFile;
use weightgen::eval::{EvalConfig, Method, Provenance, evaluate, load_subject, markdown};
use weightgen::jobs::TrainSpec;
use weightgen::proto::v1::catalog_service_client::CatalogServiceClient;
use weightgen::proto::v1::generation_service_client::GenerationServiceClient;
use weightgen::proto::v1::{ArchitectureMetadataRequest, GenerateInitRequest, SamplingOptions};
use weightgen::storage::StorageArgs;
use weightgen::tasks::featurizer::WORD_ROW;
use weightgen::tasks::words::lm::{
    Adapter, ByteLm, LoraConfig, PEFT_PREFIX, base_arch, bits_per_byte,
};
use weightgen::tasks::words::{WordLists, WordSplit};
use weightgen::tasks::{Family, TaskSpec, TrainConfig};
use weightgen::train::quality::score;
use weightgen::train::{LatentChoice, train_denoiser};

use crate::common::generation::wait_ready;
use crate::common::{spawn_server, torch_python, try_download};
use weightgen::weights::{decode_safetensors, decode_tensors, flatten};
use weightgen::zoo::{WordsBaseConfig, ZooBuildConfig, ZooDataset, build_zoo};

fn config(models: u64) -> ZooBuildConfig {
    ZooBuildConfig {
        zoo: "words-small".into(),
        family: Family::Words,
        architecture: String::new(),
        num_models: models,
        seed: 4,
        shared_init: true,
        train: TrainConfig {
            steps: 40,
            ..Family::Words.train_config()
        },
        worker: "test".into(),
        jobs: 2,
        lease: Duration::from_secs(600),
        device: Device::Cpu,
        max_models: None,
        cancel: Default::default(),
        words_base: WordsBaseConfig {
            steps: 100,
            ..Default::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_words_zoo_stores_its_base_once_and_peft_adapters_that_beat_it() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let (catalog, blobs): (Arc<dyn Catalog>, _) =
        StorageArgs::embedded(dir.path()).open().await.unwrap();
    let report = build_zoo(catalog.clone(), blobs.clone(), config(3), |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.built, report.done, report.total), (3, 3, 3));

    // The base: its own one-model zoo, every tensor of its architecture.
    let base_config = config(3).words_base;
    let base = catalog
        .zoo_model(&base_config.model_id())
        .await
        .unwrap()
        .expect("the base model is in the catalog");
    assert_eq!(base.family, "words");
    assert_eq!(base.architecture, base_arch(base_config.model).name);
    let base_bytes = blobs.get(&base.sha256).await.unwrap();
    let (tensors, _) = decode_tensors(&base_bytes).unwrap();
    let lm = ByteLm::from_tensors(base_config.model, &tensors, Device::Cpu).unwrap();
    let base_bits = base.metrics["test_bits_per_byte"];
    assert!(
        base_bits < 6.0,
        "100 steps take the base well below 8 bits per byte: {base_bits}"
    );

    let lists = WordLists::from_env().unwrap_or_else(|e| panic!("{e}"));
    let page = catalog
        .zoo_models(
            &ZooModelFilter {
                zoo: Some("words-small".into()),
                ..Default::default()
            },
            &PageRequest {
                size: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 3);
    let net = Family::Words.network("").unwrap();
    let mut shared_a = None;
    for record in &page.items {
        let task: TaskSpec = serde_json::from_value(record.task["spec"].clone()).unwrap();
        assert!(!Family::Words.is_held_out(&task), "{task:?}");
        let bytes = blobs.get(&record.sha256).await.unwrap();
        let file = decode_safetensors(&bytes).unwrap();
        // PEFT's names and config, and the base it adapts.
        assert!(file.specs.iter().all(|t| t.name.starts_with(PEFT_PREFIX)));
        assert_eq!(file.specs.len(), net.spec.tensors.len());
        assert_eq!(file.metadata["format"], "pt");
        assert_eq!(file.metadata["peft_type"], "LORA");
        assert_eq!(file.metadata["r"], "4");
        assert_eq!(file.metadata["base_model_sha256"], base.sha256);
        assert_eq!(file.metadata["base_model_id"], base.id);
        // Every adapter beats the base on its task's test words, and the
        // stored file reproduces the recorded figure.
        let (before, after) = (
            record.metrics["base_test_bits_per_byte"],
            record.metrics["test_bits_per_byte"],
        );
        assert!(after < before - 0.05, "{task:?}: {before} -> {after}");
        let flat = flatten(&net.spec, &file.tensors).unwrap();
        let adapter = Adapter::from_flat(&lm, LoraConfig::default(), &net.spec, &flat).unwrap();
        let test = task
            .words_task()
            .unwrap()
            .words(&lists, WordSplit::Test)
            .unwrap();
        let test: Vec<(&str, f64)> = test.iter().map(|(w, f)| (w.as_str(), *f)).collect();
        let rescored = bits_per_byte(&lm, Some(&adapter), &test);
        assert!((rescored - after).abs() < 1e-4, "{rescored} vs {after}");
        // One shared init: every adapter's A moved away from the same start.
        let a = &file.tensors[0].1;
        shared_a.get_or_insert_with(|| a.shallow_clone());
        // The descriptor: byte shares of the example words, their rows.
        let features = &record.task["descriptor"]["features"];
        let shares: Vec<f64> =
            serde_json::from_value(features["byte_frequencies"].clone()).unwrap();
        assert_eq!(shares.len(), 256);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        let rows = record.task["descriptor"]["support_x"].as_array().unwrap();
        assert_eq!(rows.len(), 25);
    }

    // A user's task file: K example words and their features, no data.
    let polish = TaskSpec::Words {
        language: "pl".into(),
        second: None,
        alpha: 1.0,
    };
    let file = TaskFile::of_words_task(&net.spec.name, &polish, &lists, 10, 0).unwrap();
    assert_eq!(file.support.as_ref().unwrap().inputs.len(), 10);
    assert_eq!(file.support.as_ref().unwrap().inputs[0].len(), WORD_ROW);
    assert_eq!(file.features["byte_frequencies"].len(), 256);
    assert!(file.data.is_none());
    let unknown = TaskSpec::Words {
        language: "qq".into(),
        second: None,
        alpha: 1.0,
    };
    let refused = TaskFile::of_words_task(&net.spec.name, &unknown, &lists, 10, 0).unwrap_err();
    assert!(refused.to_string().contains("language \"qq\""), "{refused}");

    // The zoo as a denoiser's dataset: adapters flat, support pools of
    // words, and its tasks scored through the base like any family's.
    let data = ZooDataset::load(&catalog, &blobs, "words-small")
        .await
        .unwrap();
    assert_eq!(data.weights.size(), [3, net.spec.num_parameters() as i64]);
    let (pool_x, pool_y) = data.support_pool.as_ref().expect("words support pools");
    // Each word reaches the encoder as its bag of bytes (256 shares, length).
    assert_eq!(pool_x.size(), [3, 128, 257]);
    assert_eq!(pool_y.size(), [3, 128, 0]);
    for (i, (task, record)) in data.tasks.iter().zip(&data.models).enumerate() {
        let scored = score(&data, task, &data.weights.get(i as i64));
        let recorded = record.metrics["test_bits_per_byte"];
        assert!((scored - recorded).abs() < 1e-4, "{scored} vs {recorded}");
    }
    let held = data.words.as_ref().unwrap().describe(&polish);
    assert_eq!(held.support_x.len(), 25);

    // Served: a denoiser of the zoo's adapters answers GenerateInit with a
    // PEFT adapter that names its base (header, file, ArchitectureMetadata),
    // the base is a download away, and the adapter loads onto it.
    let spec = TrainSpec {
        zoo: "words-small".into(),
        steps: 30,
        widths: vec![64, 32],
        latent: LatentChoice::None,
        eval_tasks: 1,
        log_every: 30,
        checkpoint_every: 0,
        activate: true,
        ..TrainSpec::default()
    };
    let training = spec
        .to_config("words-small-v1", Device::Cpu, false, Default::default())
        .unwrap();
    train_denoiser(catalog.clone(), blobs.clone(), training, |_, _, _| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let server = spawn_server(|c| c.storage = StorageArgs::embedded(dir.path())).await;
    let mut client = GenerationServiceClient::new(server.channel().await);
    wait_ready(&mut client).await;
    let request = GenerateInitRequest {
        task: Some(file.to_proto()),
        options: Some(SamplingOptions {
            num_samples: 1,
            seed: Some(3),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = weightgen::client::generate(server.channel().await, request, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let named = answer.header.architecture.unwrap().base_model.unwrap();
    assert_eq!(
        (
            named.architecture,
            named.zoo_model_id.clone(),
            named.sha256.clone()
        ),
        (
            base.architecture.clone(),
            base.id.clone(),
            base.sha256.clone()
        )
    );
    let generated = decode_safetensors(&answer.files[0]).unwrap();
    assert!(
        generated
            .specs
            .iter()
            .all(|t| t.name.starts_with(PEFT_PREFIX))
    );
    assert_eq!(generated.metadata["peft_type"], "LORA");
    assert_eq!(generated.metadata["base_model_id"], base.id);
    assert_eq!(generated.metadata["base_model_sha256"], base.sha256);
    let described = client
        .architecture_metadata(ArchitectureMetadataRequest {
            name: net.spec.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.base_model.unwrap().zoo_model_id, base.id);
    let mut catalog_client = CatalogServiceClient::new(server.channel().await);
    let downloaded = try_download(&mut catalog_client, &named.zoo_model_id)
        .await
        .unwrap();
    assert_eq!(sha256_hex(&downloaded), named.sha256);
    let (base_tensors, _) = decode_tensors(&downloaded).unwrap();
    let served_base = ByteLm::from_tensors(base_config.model, &base_tensors, Device::Cpu).unwrap();
    let flat = flatten(&net.spec, &generated.tensors).unwrap();
    let adapter =
        Adapter::from_flat(&served_base, LoraConfig::default(), &net.spec, &flat).unwrap();
    let test = polish
        .words_task()
        .unwrap()
        .words(&lists, WordSplit::Test)
        .unwrap();
    let test: Vec<(&str, f64)> = test.iter().map(|(w, f)| (w.as_str(), *f)).collect();
    let bits = bits_per_byte(&served_base, Some(&adapter), &test);
    assert!(bits.is_finite() && bits > 0.0, "{bits}");
    // The Python example scores the same words the same, base and adapter
    // loaded in plain PyTorch from the files a user downloads.
    let words: Vec<&str> = test.iter().take(40).map(|(w, _)| *w).collect();
    let base_file = dir.path().join("base.safetensors");
    let adapter_file = dir.path().join("adapter.safetensors");
    std::fs::write(&base_file, &downloaded).unwrap();
    std::fs::write(&adapter_file, &answer.files[0]).unwrap();
    crate::common::transformers_reads(&adapter_file);
    crate::common::transformers_reads(&base_file);
    let output = std::process::Command::new(torch_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/clients/python/examples/words_adapter.py"
        ))
        .arg("--base")
        .arg(&base_file)
        .arg("--adapter")
        .arg(&adapter_file)
        .arg("--json")
        .arg("--words")
        .args(&words)
        .output()
        .unwrap();
    let text = crate::common::combined_output(&output);
    assert!(output.status.success(), "{text}");
    let printed: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let equal: Vec<(&str, f64)> = words.iter().map(|w| (*w, 1.0)).collect();
    for (key, adapter) in [("base", None), ("adapted", Some(&adapter))] {
        let rust = bits_per_byte(&served_base, adapter, &equal);
        let python = printed[key].as_f64().unwrap();
        assert!(
            (rust - python).abs() < 1e-4,
            "{key}: Rust {rust}, PyTorch {python}"
        );
    }
    server.server.shutdown().await.unwrap();

    // The evaluation harness runs on adapters as on any family: held-out
    // languages, fine-tuning through the frozen base, every baseline.
    let subject = load_subject(&catalog, &blobs, "words-small", None, Device::Cpu)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let eval_config = EvalConfig {
        tasks: 2,
        few_shot: vec![10],
        only: Some(vec![
            Method::WeightgenDdimGuided,
            Method::WeightgenFeaturesOnly,
            Method::NearestZoo,
            Method::ZooAverage,
            Method::Reptile,
            Method::Hypernetwork,
        ]),
        ..EvalConfig::profile(true, Family::Words)
    };
    assert_eq!(eval_config.eval_every, 10);
    let report = evaluate(&subject.checkpoint, &subject.data, &eval_config).unwrap();
    assert_eq!(report.metric, "bits per byte");
    assert_eq!((report.tasks, report.seeds), (2, 1));
    let random = &report.methods[&Method::Random];
    // PEFT's init (B = 0) is the base: fine-tuning it on the task's words
    // lowers its test bits per byte, and training fully lowers them more.
    let curve = &report.curves[&Method::Random];
    assert_eq!(curve.len(), eval_config.finetune_steps + 1);
    assert!(curve[20] < curve[0], "{curve:?}");
    // Measured every 10 steps: the steps between carry the last measurement.
    assert_eq!(curve[1], curve[0]);
    assert!(
        report.fully_trained.mean < random.zero_shot.mean,
        "fully trained {} against the base {}",
        report.fully_trained.mean,
        random.zero_shot.mean
    );
    for (method, scores) in &report.methods {
        let bits = scores.zero_shot.mean;
        assert!(bits.is_finite() && bits > 0.0, "{method:?}: {bits}");
        assert!(scores.few_shot[&10].mean.is_finite(), "{method:?}");
    }
    // Meta-learning moved Reptile's adapter off PEFT's init.
    assert_ne!(
        report.methods[&Method::Reptile].zero_shot.mean,
        random.zero_shot.mean
    );
    let who = Provenance {
        title: "words".into(),
        command: "test".into(),
        commit: "test".into(),
        machine: "test".into(),
        denoiser: "words-small-v1".into(),
    };
    let text = markdown(&report, &eval_config, &who, &[]);
    assert!(text.contains("bits per byte"), "{text}");
    // Held-out tasks are grouped by whether the zoo has their script, and
    // every run is in one group.
    let grouped: usize = report
        .groups
        .values()
        .map(|g| g[&Method::Random].runs)
        .sum();
    assert_eq!(grouped, report.tasks * report.seeds);
    for (group, full) in &report.group_fully_trained {
        let base = report.groups[group][&Method::Random].zero_shot.mean;
        assert!(
            full.mean < base,
            "{group}: fully trained {full:?}, base {base}"
        );
    }
    assert_eq!(report.group_fully_trained.len(), report.groups.len());
    assert!(text.contains("By held-out group:"), "{text}");

    // A second run finds everything built and retrains nothing.
    let again = build_zoo(catalog.clone(), blobs.clone(), config(3), |_| {})
        .await
        .unwrap();
    assert_eq!((again.built, again.done), (0, 3));
    let still = catalog
        .zoo_model(&base_config.model_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still.sha256, base.sha256);
}
