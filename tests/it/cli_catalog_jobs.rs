//! The `weightgen` CLI against a real server for the catalog and job
//! services: an uploaded checkpoint is listed and downloads byte for byte;
//! bad uploads, unknown ids and bad flags fail with exit 1 (server) or 2
//! (local) and a message naming the problem; jobs are submitted, listed,
//! cancelled and waited for, `jobs wait` exiting 0 only for a success.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::{TestServer, combined_output, spawn_server};
use weightgen::blobs::sha256_hex;
use weightgen::catalog::{JobOutcome, now_ms};
use weightgen::tasks::Family;

const CLI: &str = env!("CARGO_BIN_EXE_weightgen");
const ARCH: &str = "digits-mlp-64-32-5";

/// Runs the CLI against `test`'s server off the async runtime.
async fn cli(test: &TestServer, args: &[&str]) -> Output {
    let addr = test.addr();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(CLI)
            .args(["--addr", &addr, "--timeout", "10s"])
            .args(&args)
            .env_remove("WEIGHTGEN_ADDR")
            .env_remove("WEIGHTGEN_TIMEOUT")
            .output()
            .expect("run weightgen")
    })
    .await
    .expect("the CLI thread")
}

/// Asserts the exit code; returns stdout and stderr together.
fn expect(output: &Output, code: i32, what: &str) -> String {
    let text = combined_output(output);
    assert_eq!(output.status.code(), Some(code), "{what}:\n{text}");
    text
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The JSON objects a `--json` command printed, one per line.
fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// A digits MLP checkpoint with deterministic values (pure Rust, no tch).
fn checkpoint() -> Vec<u8> {
    let spec = Family::Digits.network("").unwrap().spec;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = spec
        .tensors
        .iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| ((i as f32 * 0.37).sin() * 0.1).to_le_bytes())
                .collect();
            (t.name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_commands_upload_list_download_and_name_failures() {
    let test = spawn_server(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = checkpoint();
    let upload_path = dir.path().join("mine.safetensors");
    std::fs::write(&upload_path, &file).unwrap();
    let upload = path_str(&upload_path);

    // Refused uploads name the problem and store nothing.
    let out = cli(
        &test,
        &[
            "models",
            "upload",
            upload,
            "--architecture",
            "sinusoid-mlp-1-40-40-1",
        ],
    )
    .await;
    let text = expect(&out, 1, "a digits file as a sinusoid architecture");
    assert!(
        text.contains("weightgen: models upload: InvalidArgument: file.tensors:"),
        "{text}"
    );
    let out = cli(
        &test,
        &["models", "upload", upload, "--architecture", "nope"],
    )
    .await;
    let text = expect(&out, 1, "an unknown architecture");
    assert!(
        text.contains("NotFound: header.architecture: \"nope\""),
        "{text}"
    );
    let missing = dir.path().join("missing.safetensors");
    let out = cli(
        &test,
        &[
            "models",
            "upload",
            path_str(&missing),
            "--architecture",
            ARCH,
        ],
    )
    .await;
    let text = expect(&out, 1, "a missing file");
    assert!(text.contains("missing.safetensors"), "{text}");
    for (flag, value) in [
        ("--metric", "accuracy"),
        ("--metric", "accuracy=high"),
        ("--feature", "=1"),
        ("--training-config", "[1]"),
    ] {
        let out = cli(
            &test,
            &[
                "models",
                "upload",
                upload,
                "--architecture",
                ARCH,
                flag,
                value,
            ],
        )
        .await;
        let text = expect(&out, 2, "a malformed flag");
        assert!(
            text.contains(&format!("weightgen: models upload: {flag}")),
            "{text}"
        );
    }
    let out = cli(&test, &["models", "list", "--json"]).await;
    expect(&out, 0, "listing an empty zoo");
    assert!(json_lines(&out).is_empty());

    // A good upload, then the same file again: deduplicated.
    let out = cli(
        &test,
        &[
            "models",
            "upload",
            upload,
            "--architecture",
            ARCH,
            "--family",
            "digits",
            "--feature",
            "input_mean=4.5",
            "--metric",
            "test_accuracy=0.93",
            "--seed",
            "7",
            "--training-config",
            r#"{"lr": 0.01}"#,
            "--json",
        ],
    )
    .await;
    expect(&out, 0, "a good upload");
    let uploaded = json_lines(&out);
    let id = uploaded[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(uploaded[0]["sha256"], sha256_hex(&file).as_str());
    assert_eq!(uploaded[0]["size_bytes"], file.len() as u64);
    assert_eq!(uploaded[0]["deduplicated"], false);
    let out = cli(&test, &["models", "upload", upload, "--architecture", ARCH]).await;
    let text = expect(&out, 0, "the same upload again");
    assert!(
        text.contains(&format!("is already stored as {id}")),
        "{text}"
    );

    // Listed (in a table and as JSON, filtered), described.
    let out = cli(&test, &["models", "list"]).await;
    let text = expect(&out, 0, "models list");
    let row = text
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} listed:\n{text}"));
    assert!(row.contains(ARCH) && row.contains("ingested"), "{row}");
    assert!(row.contains("test_accuracy=0.93"), "{row}");
    let out = cli(&test, &["models", "list", "--architecture", ARCH, "--json"]).await;
    expect(&out, 0, "models list --architecture");
    let listed = json_lines(&out);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["task"]["features"]["input_mean"][0], 4.5);
    let out = cli(
        &test,
        &["models", "list", "--architecture", "sinusoid-mlp-1-40-40-1"],
    )
    .await;
    assert!(!expect(&out, 0, "another architecture").contains(&id));
    let out = cli(&test, &["models", "get", &id]).await;
    let text = expect(&out, 0, "models get");
    assert!(
        text.lines()
            .any(|l| l.starts_with("seed:") && l.ends_with(" 7")),
        "{text}"
    );
    assert!(text.contains("input_mean=4.5"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("test_accuracy") && l.ends_with(" 0.93")),
        "{text}"
    );
    assert!(text.contains(&sha256_hex(&file)), "{text}");
    let out = cli(&test, &["models", "get", "nope"]).await;
    let text = expect(&out, 1, "an unknown model");
    assert!(text.contains("weightgen: models get: NotFound:"), "{text}");

    // Downloaded byte for byte, with no partial file left behind; an unknown
    // id writes nothing.
    let downloaded = dir.path().join("downloaded.safetensors");
    let out = cli(
        &test,
        &["models", "download", &id, "-o", path_str(&downloaded)],
    )
    .await;
    let text = expect(&out, 0, "models download");
    assert!(text.contains(&sha256_hex(&file)), "{text}");
    assert_eq!(std::fs::read(&downloaded).unwrap(), file);
    assert!(!dir.path().join("downloaded.safetensors.part").exists());
    let nothing = dir.path().join("nothing.safetensors");
    let out = cli(
        &test,
        &["models", "download", "nope", "-o", path_str(&nothing)],
    )
    .await;
    let text = expect(&out, 1, "downloading an unknown model");
    assert!(text.contains("NotFound"), "{text}");
    assert!(!nothing.exists() && !dir.path().join("nothing.safetensors.part").exists());

    // The architecture the upload used is listed with its size.
    let out = cli(&test, &["architectures"]).await;
    let text = expect(&out, 0, "architectures");
    let row = text
        .lines()
        .find(|l| l.starts_with(ARCH))
        .unwrap_or_else(|| panic!("{ARCH} listed:\n{text}"));
    assert!(row.contains("digits") && row.contains("2245"), "{row}");
    let out = cli(&test, &["architectures", "--family", "digits", "--json"]).await;
    expect(&out, 0, "architectures --json");
    let archs = json_lines(&out);
    assert!(
        archs.iter().any(|a| a["name"] == ARCH
            && a["num_parameters"] == 2245
            && a["tensors"][0]["name"] == "0.weight"),
        "{archs:?}"
    );

    // Denoisers: none yet; activating an unknown one names the failure.
    let out = cli(&test, &["denoisers", "list", "--json"]).await;
    expect(&out, 0, "denoisers list");
    assert!(json_lines(&out).is_empty());
    let out = cli(&test, &["denoisers", "activate", "nope"]).await;
    let text = expect(&out, 1, "activating an unknown denoiser");
    assert!(
        text.contains("weightgen: denoisers activate: NotFound:"),
        "{text}"
    );

    // No server: a connection error, exit 1.
    let out = tokio::task::spawn_blocking(|| {
        Command::new(CLI)
            .args(["--addr", "127.0.0.1:1", "models", "list"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = expect(&out, 1, "no server");
    assert!(
        text.contains("weightgen: models list: cannot connect to 127.0.0.1:1"),
        "{text}"
    );
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_commands_submit_list_cancel_and_wait() {
    let test = spawn_server(|_| {}).await;
    let submit_zoo = [
        "jobs",
        "submit-zoo",
        "--family",
        "digits",
        "--num-models",
        "3",
        "--steps",
        "5",
        "--idempotency-key",
        "zoo-1",
        "--json",
    ];

    // Submitted (twice with one key: one job), listed as queued.
    let out = cli(&test, &submit_zoo).await;
    expect(&out, 0, "jobs submit-zoo");
    let job = &json_lines(&out)[0];
    let zoo_job = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["state"], "JOB_STATE_QUEUED");
    assert_eq!(job["build_zoo"]["num_models"], 3);
    assert_eq!(job["build_zoo"]["steps"], 5);
    let out = cli(&test, &submit_zoo).await;
    expect(&out, 0, "the same submission again");
    assert_eq!(json_lines(&out)[0]["id"], zoo_job.as_str());
    let out = cli(&test, &["jobs", "list"]).await;
    let text = expect(&out, 0, "jobs list");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("job-")).collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert!(
        rows[0].starts_with(&zoo_job)
            && rows[0].contains("build_zoo")
            && rows[0].contains("queued"),
        "{text}"
    );
    let out = cli(&test, &["jobs", "list", "--state", "queued", "--json"]).await;
    expect(&out, 0, "jobs list --state queued");
    assert_eq!(json_lines(&out).len(), 1);

    // Cancelled: get says so, wait exits 1 naming it.
    let out = cli(&test, &["jobs", "cancel", &zoo_job]).await;
    assert!(expect(&out, 0, "jobs cancel").contains(&format!("cancelled {zoo_job}")));
    let out = cli(&test, &["jobs", "get", &zoo_job]).await;
    let text = expect(&out, 0, "jobs get");
    assert!(
        text.lines()
            .any(|l| l.starts_with("state:") && l.trim_end().ends_with("cancelled")),
        "{text}"
    );
    let out = cli(&test, &["jobs", "list", "--state", "queued", "--json"]).await;
    assert!(json_lines(&out).is_empty());
    let out = cli(&test, &["jobs", "list", "--state", "cancelled", "--json"]).await;
    assert_eq!(json_lines(&out)[0]["id"], zoo_job.as_str());
    let out = cli(&test, &["jobs", "wait", &zoo_job, "--poll", "100ms"]).await;
    let text = expect(&out, 1, "waiting for a cancelled job");
    assert!(
        text.contains(&format!(
            "weightgen: jobs wait: job {zoo_job} was cancelled"
        )),
        "{text}"
    );

    // A training job: --max-wait runs out while it is queued; a worker
    // (played here through the catalog) reports progress, and wait exits 0
    // once it succeeds.
    let out = cli(
        &test,
        &[
            "jobs",
            "submit-train",
            "--zoo",
            "digits",
            "--steps",
            "10",
            "--denoiser-id",
            "digits-cli",
            "--max-attempts",
            "1",
        ],
    )
    .await;
    let text = expect(&out, 0, "jobs submit-train");
    let train_job = stdout(&out)
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("a job id:\n{text}"))
        .to_owned();
    assert!(text.contains("(train_denoiser, queued)"), "{text}");
    let out = cli(
        &test,
        &[
            "jobs",
            "wait",
            &train_job,
            "--poll",
            "100ms",
            "--max-wait",
            "300ms",
        ],
    )
    .await;
    let text = expect(&out, 1, "--max-wait");
    assert!(text.contains("is still queued after 300ms"), "{text}");
    let catalog = test.server.catalog().clone();
    let claimed = catalog
        .claim_job("worker-t", now_ms() - 60_000)
        .await
        .unwrap()
        .expect("the training job is claimable");
    assert_eq!(claimed.id, train_job);
    catalog
        .heartbeat_job(&train_job, "worker-t", 0.5, "step 5/10")
        .await
        .unwrap();
    let out = cli(&test, &["jobs", "list", "--state", "running"]).await;
    let text = expect(&out, 0, "jobs list --state running");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&train_job) && l.contains("50%") && l.contains("step 5/10")),
        "{text}"
    );
    let waiting = {
        let addr = test.addr();
        let id = train_job.clone();
        std::thread::spawn(move || {
            Command::new(CLI)
                .args(["--addr", &addr, "jobs", "wait", &id, "--poll", "100ms"])
                .output()
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    catalog
        .finish_job(
            &train_job,
            "worker-t",
            &JobOutcome::Succeeded {
                denoiser_id: Some("digits-cli".into()),
                models_built: 0,
            },
        )
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || waiting.join().unwrap())
        .await
        .unwrap();
    let text = expect(&out, 0, "waiting for a job that succeeds");
    assert!(
        text.contains("succeeded") && text.contains("denoiser digits-cli"),
        "{text}"
    );

    // A job whose only attempt fails: wait exits 1 with the reason.
    let out = cli(
        &test,
        &[
            "jobs",
            "submit-zoo",
            "--family",
            "sinusoid",
            "--num-models",
            "2",
            "--max-attempts",
            "1",
            "--json",
        ],
    )
    .await;
    expect(&out, 0, "a second zoo job");
    let failing = json_lines(&out)[0]["id"].as_str().unwrap().to_owned();
    let claimed = catalog
        .claim_job("worker-t", now_ms() - 60_000)
        .await
        .unwrap()
        .expect("the zoo job is claimable");
    assert_eq!(claimed.id, failing);
    catalog
        .finish_job(
            &failing,
            "worker-t",
            &JobOutcome::Failed {
                error: "the disk is full".into(),
            },
        )
        .await
        .unwrap();
    let out = cli(&test, &["jobs", "wait", &failing, "--poll", "100ms"]).await;
    let text = expect(&out, 1, "waiting for a failed job");
    assert!(
        text.contains(&format!(
            "weightgen: jobs wait: job {failing} failed after 1 of 1 attempts: the disk is full"
        )),
        "{text}"
    );

    // Failures: unknown ids and specs the server refuses (exit 1), flags
    // refused locally (exit 2).
    let out = cli(&test, &["jobs", "get", "job-nope"]).await;
    assert!(expect(&out, 1, "an unknown job").contains("weightgen: jobs get: NotFound:"));
    let out = cli(
        &test,
        &[
            "jobs",
            "submit-zoo",
            "--family",
            "cifar",
            "--num-models",
            "3",
        ],
    )
    .await;
    let text = expect(&out, 1, "an unknown family");
    assert!(
        text.contains("weightgen: jobs submit-zoo: InvalidArgument: build_zoo.family:"),
        "{text}"
    );
    // The server checks every spec (one set of rules, naming the field).
    for (args, field) in [
        (
            &[
                "jobs",
                "submit-zoo",
                "--family",
                "digits",
                "--num-models",
                "3",
                "--learning-rate",
                "0",
            ][..],
            "build_zoo.learning_rate",
        ),
        (
            &["jobs", "submit-zoo", "--family", "digits", "--models", "0"],
            "build_zoo.num_models",
        ),
        (
            &[
                "jobs",
                "submit-train",
                "--zoo",
                "digits",
                "--cond-dropout",
                "1.5",
            ],
            "train_denoiser.cond_dropout",
        ),
    ] {
        let out = cli(&test, args).await;
        let text = expect(&out, 1, &format!("{args:?}"));
        assert!(
            text.contains(&format!("InvalidArgument: {field}:")),
            "{text}"
        );
    }
    for args in [
        &[
            "jobs",
            "submit-train",
            "--zoo",
            "digits",
            "--kind",
            "resnet",
        ][..],
        &[
            "jobs",
            "submit-train",
            "--zoo",
            "digits",
            "--config-json",
            "{}",
        ],
        &["jobs", "wait", &failing, "--poll", "0s"],
        &["jobs", "list", "--state", "sleeping"],
    ] {
        let out = cli(&test, args).await;
        expect(&out, 2, &format!("{args:?}"));
    }
    test.server.shutdown().await.unwrap();
}
