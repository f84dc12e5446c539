//! A small `words` zoo built by the zoo builder on an embedded catalog: the
//! base model trained once and stored as its own one-model zoo, LoRA
//! adapters of it trained from one shared init on zoo-side tasks, each file
//! PEFT-named with the adapter config and the base's SHA-256 in its
//! metadata, each adapter better than the base on its task's test words,
//! and a second run that finds everything built. Needs WEIGHTGEN_WORDS_DIR
//! (scripts/test.sh sources the bootstrap, which sets it).

use std::sync::Arc;
use std::time::Duration;

use tch::Device;
use weightgen::catalog::{Catalog, PageRequest, ZooModelFilter};
use weightgen::client::TaskFile;
use weightgen::storage::StorageArgs;
use weightgen::tasks::featurizer::WORD_ROW;
use weightgen::tasks::words::lm::{
    Adapter, ByteLm, LoraConfig, PEFT_PREFIX, base_arch, bits_per_byte,
};
use weightgen::tasks::words::{WordLists, WordSplit};
use weightgen::tasks::{Family, TaskSpec, TrainConfig};
use weightgen::train::quality::score;
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
