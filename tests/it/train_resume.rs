//! Kill-and-resume: a training run SIGKILLed mid-way and continued with
//! `train --resume` publishes the very same denoiser as a run that was never
//! interrupted (same seed), byte for byte; resuming under other settings,
//! or restarting over a checkpoint without `--resume`, is refused by name.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use weightgen::storage::StorageArgs;

const WORKER: &str = env!("CARGO_BIN_EXE_weightgen-worker");
const STEPS: &str = "600";

fn worker(data_dir: &Path) -> Command {
    let mut command = Command::new(WORKER);
    command
        .args(["--log-format", "json"])
        .env("WEIGHTGEN_DATA_DIR", data_dir);
    command
}

fn train_args(id: &str) -> Vec<String> {
    [
        "train",
        "--zoo",
        "digits",
        "--denoiser-id",
        id,
        "--steps",
        STEPS,
        "--checkpoint-every",
        "100",
        "--log-every",
        "100",
        "--widths",
        "64,32",
        "--learning-rate",
        "1e-3",
        "--eval-tasks",
        "2",
        "--seed",
        "11",
        "--device",
        "cpu",
        // One intra-op thread: faster for this small denoiser (libtorch's
        // hand-offs cost more than its matrices) and deterministic.
        "--threads",
        "1",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn checked(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Step of the run's latest checkpoint, read from the pointer object.
fn checkpoint_step(data_dir: &Path, id: &str) -> Option<u64> {
    let pointer = data_dir.join(format!("blobs/named/training/{id}/state"));
    let bytes = std::fs::read(pointer).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    json["step"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (25 s here): two training runs; scripts/test.sh runs it"]
async fn a_killed_run_resumes_to_the_same_denoiser_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path();
    checked(
        worker(data_dir)
            .args(["zoo", "build", "--family", "digits", "--models", "40"])
            .args(["--shared-init", "--steps", "30"])
            .output()
            .unwrap(),
    );

    // The reference: one uninterrupted run.
    let reference = checked(
        worker(data_dir)
            .args(train_args("straight"))
            .output()
            .unwrap(),
    );
    assert!(
        reference.contains("published denoiser straight "),
        "{reference}"
    );

    // The same run, SIGKILLed once it has saved a checkpoint.
    let mut child = worker(data_dir)
        .args(train_args("killed"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let killed_after = loop {
        if let Some(step) = checkpoint_step(data_dir, "killed") {
            child.kill().unwrap();
            break step;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint was seen"
        );
        assert!(Instant::now() < deadline, "no checkpoint within 300 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.wait().unwrap();
    let final_step = checkpoint_step(data_dir, "killed").unwrap();
    assert!(
        final_step < 600,
        "killed at checkpoint {killed_after}, last {final_step}: the kill came too late"
    );
    let (catalog, blobs) = StorageArgs::embedded(data_dir).open().await.unwrap();
    assert!(catalog.denoiser("killed").await.unwrap().is_none());

    // Restarting without --resume would silently throw work away: refused.
    let restart = worker(data_dir)
        .args(train_args("killed"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&restart.stderr);
    assert_eq!(restart.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("resume: run \"killed\" has a checkpoint at step"),
        "{stderr}"
    );

    // Resuming under a different learning rate is refused, naming it.
    let mut changed = train_args("killed");
    let lr = changed.iter().position(|a| a == "1e-3").unwrap();
    changed[lr] = "5e-4".into();
    changed.push("--resume".into());
    let refused = worker(data_dir).args(&changed).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("resume: the checkpoint was trained with learning_rate = 0.001"),
        "{stderr}"
    );

    let mut resume = train_args("killed");
    resume.push("--resume".into());
    let resumed = checked(worker(data_dir).args(&resume).output().unwrap());
    assert!(
        resumed.contains(&format!(
            "published denoiser killed (resumed at step {final_step})"
        )),
        "{resumed}"
    );

    // Same weights, EMA, loss curve and quality figures: the same file.
    let straight = catalog.denoiser("straight").await.unwrap().unwrap();
    let killed = catalog.denoiser("killed").await.unwrap().unwrap();
    assert_eq!(straight.sha256, killed.sha256, "resumed run differs");
    let metrics = |id: &str| {
        let blobs = blobs.clone();
        let name = format!("training/{id}/metrics.json");
        async move {
            let bytes = blobs.get_named(&name).await.unwrap().unwrap();
            let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            json["curve"].clone()
        }
    };
    assert_eq!(metrics("straight").await, metrics("killed").await);
    assert!(
        blobs
            .get_named("training/killed/state")
            .await
            .unwrap()
            .is_none()
    );
}
