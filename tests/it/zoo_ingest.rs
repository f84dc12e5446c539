//! `weightgen zoo ingest DIR`: users' checkpoints are validated against
//! their architecture, deduplicated by SHA-256, and refused one by one with
//! a reason while the rest are added.

use std::collections::HashMap;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use weightgen::catalog::{PageRequest, ZooModelFilter};
use weightgen::storage::StorageArgs;
use weightgen::tasks::Family;
use weightgen::weights::{DType, encode_safetensors};

fn write_checkpoint(path: &std::path::Path, shapes: &[(&str, &[i64])], fill: f64) {
    let tensors: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(name, shape)| {
            (
                name.to_string(),
                Tensor::full(*shape, fill, (Kind::Float, Device::Cpu)),
            )
        })
        .collect();
    std::fs::write(
        path,
        encode_safetensors(&tensors, DType::F32, &HashMap::new()).unwrap(),
    )
    .unwrap();
}

#[tokio::test]
async fn checkpoints_are_validated_deduplicated_and_refused_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let input = dir.path();
    let good: &[(&str, &[i64])] = &[
        ("0.weight", &[32, 64]),
        ("0.bias", &[32]),
        ("2.weight", &[5, 32]),
        ("2.bias", &[5]),
    ];
    write_checkpoint(&input.join("a.safetensors"), good, 0.1);
    write_checkpoint(&input.join("b.safetensors"), good, 0.2);
    write_checkpoint(&input.join("a-copy.safetensors"), good, 0.1);
    write_checkpoint(&input.join("nan.safetensors"), good, f64::NAN);
    let wrong: &[(&str, &[i64])] = &[("0.weight", &[16, 64]), ("0.bias", &[16])];
    write_checkpoint(&input.join("wrong.safetensors"), wrong, 0.1);
    write_checkpoint(&input.join("undescribed.safetensors"), good, 0.3);
    std::fs::write(input.join("garbage.safetensors"), b"not a safetensors file").unwrap();
    let arch = "digits-mlp-64-32-5";
    let line = |file: &str, acc: f64| {
        format!(
            r#"{{"file": "{file}", "architecture": "{arch}", "family": "digits", "task": {{"classes": [0, 1, 2, 3, 4]}}, "metrics": {{"test_accuracy": {acc}}}, "seed": 7}}"#
        )
    };
    let metadata = [
        line("a.safetensors", 0.9),
        line("b.safetensors", 0.8),
        line("a-copy.safetensors", 0.9),
        line("nan.safetensors", 0.1),
        line("wrong.safetensors", 0.5),
        line("garbage.safetensors", 0.5),
        line("missing.safetensors", 0.5),
        r#"{"file": "x.safetensors", "architecture": "nope"}"#.to_owned(),
        "{not json".to_owned(),
    ]
    .join("\n");
    std::fs::write(input.join("metadata.jsonl"), metadata).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_weightgen"))
        .args(["zoo", "ingest", input.to_str().unwrap(), "--zoo", "mine"])
        .args(["--data-dir", data.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "some files were refused:\n{stdout}"
    );
    let expect = |needle: &str| assert!(stdout.contains(needle), "{needle:?} not in:\n{stdout}");
    expect("added      a.safetensors");
    expect("added      b.safetensors");
    expect("duplicate  a-copy.safetensors is already stored as mine/");
    expect("refused    nan.safetensors: tensors: tensor \"0.");
    expect("holds NaN or infinite values");
    expect("refused    wrong.safetensors: tensors: checkpoint does not match architecture");
    expect("tensor \"0.weight\" has shape [16, 64], expected [32, 64]");
    expect("missing tensor \"2.weight\"");
    expect("refused    garbage.safetensors: file: not a safetensors file");
    expect("refused    missing.safetensors: file:");
    expect("refused    x.safetensors: architecture: \"nope\" is not registered");
    expect("metadata.jsonl:9: metadata:");
    expect("refused    undescribed.safetensors: no line in");
    expect("2 added, 1 duplicates, 7 refused");

    // The catalog holds exactly the two good files, with their metadata.
    let (catalog, blobs) = StorageArgs::embedded(data.path()).open().await.unwrap();
    let filter = ZooModelFilter {
        zoo: Some("mine".into()),
        ..Default::default()
    };
    let models = catalog
        .zoo_models(&filter, &PageRequest::first(0))
        .await
        .unwrap()
        .items;
    assert_eq!(models.len(), 2);
    assert!(models.iter().all(|m| m.seed == 7 && m.family == "digits"));
    assert_eq!(
        catalog.architecture(arch).await.unwrap().unwrap(),
        Family::Digits.networks()[0].spec
    );
    assert_eq!(
        blobs.list().await.unwrap().len(),
        2,
        "refused files store nothing"
    );
    // Ingesting again adds nothing.
    let again = Command::new(env!("CARGO_BIN_EXE_weightgen"))
        .args(["zoo", "ingest", input.to_str().unwrap(), "--zoo", "mine"])
        .args(["--data-dir", data.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 added, 3 duplicates, 7 refused"));
}
