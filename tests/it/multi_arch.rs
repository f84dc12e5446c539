//! One denoiser of several architectures (issue 21): the worker trains it on
//! two `digits` zoos of different widths (`train --also-zoo`), publishes a
//! catalog row per architecture on one blob, and the server serves each
//! architecture from it — and, once `weightgen-worker add-architecture`
//! publishes it for a width it never saw, that one too; a spec that cannot
//! be trained so, and an architecture that does not fit, are refused by
//! field.

use crate::common::generation::{Client, descriptor, generate, wait_ready, worker, worker_refused};
use crate::common::spawn_server;

fn zoo(data: &std::path::Path, name: &str, architecture: &str) {
    worker(
        data,
        &[
            "zoo",
            "build",
            "--family",
            "digits",
            "--zoo",
            name,
            "--architecture",
            architecture,
            "--models",
            "40",
            "--shared-init",
            "--steps",
            "30",
        ],
    );
}

type Catalog = std::sync::Arc<dyn weightgen::catalog::Catalog>;

/// The embedded catalog in `data`, with its active denoiser rows of the
/// narrow and the wide architecture.
async fn active_rows(
    data: &std::path::Path,
) -> (
    Catalog,
    weightgen::catalog::DenoiserRecord,
    weightgen::catalog::DenoiserRecord,
) {
    let (catalog, _): (Catalog, _) = weightgen::storage::StorageArgs::embedded(data)
        .open()
        .await
        .unwrap();
    let mut rows = Vec::new();
    for architecture in ["digits-mlp-64-32-5", "digits-mlp-64-64-5"] {
        rows.push(
            catalog
                .active_denoiser(architecture)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("no active denoiser for {architecture}")),
        );
    }
    let wide = rows.pop().unwrap();
    (catalog, rows.pop().unwrap(), wide)
}

/// One sample for `task`, asked again while its architecture's denoiser is
/// still loading.
async fn generate_once_loaded(
    client: &mut Client,
    task: &weightgen::proto::v1::TaskDescriptor,
) -> crate::common::generation::Answer {
    loop {
        match generate(client, task, 7).await {
            Ok(answer) => return answer,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(status) => panic!("{}: {status}", task.architecture),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_denoiser_serves_two_widths_from_one_checkpoint() {
    let server = spawn_server(|c| c.reload_interval = std::time::Duration::from_millis(100)).await;
    let data = server.data_dir.path().join("data");
    zoo(&data, "narrow", "digits-mlp-64-32-5");
    zoo(&data, "wide", "digits-mlp-64-64-5");
    let train = [
        "train",
        "--zoo",
        "narrow",
        "--also-zoo",
        "wide",
        "--denoiser-id",
        "both",
        "--steps",
        "200",
        "--widths",
        "64,32",
        "--learning-rate",
        "1e-3",
        "--eval-tasks",
        "3",
        "--log-every",
        "100",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--activate",
    ];
    // Without --latent none: refused by field, nothing published.
    let text = worker_refused(&data, &train);
    assert!(
        text.contains("train_denoiser.also_zoos") && text.contains("latent must be none"),
        "{text}"
    );
    let published = worker(&data, &[&train[..], &["--latent", "none"]].concat());
    // One line per architecture, each with its own gate.
    assert!(
        published.contains("published denoiser both (digits-mlp-64-32-5, active)")
            && published.contains("and as both.digits-mlp-64-64-5 (digits-mlp-64-64-5)"),
        "{published}"
    );
    let mut client = Client::new(server.channel().await);
    wait_ready(&mut client).await;
    let (catalog, narrow, wide) = active_rows(&data).await;
    assert_eq!(
        (narrow.id.as_str(), wide.id.as_str()),
        ("both", "both.digits-mlp-64-64-5")
    );
    assert_eq!(narrow.sha256, wide.sha256, "one checkpoint");
    // Each row's summary holds its own architecture's gate.
    let key = "quality.held_out.ddim_test_accuracy";
    assert!(narrow.summary.contains_key(key) && wide.summary.contains_key(key));
    assert_eq!(
        wide.summary[key],
        narrow.summary[&format!("digits-mlp-64-64-5/{key}")]
    );
    // Served: a request per architecture gets that architecture's tensors.
    for (architecture, hidden, id) in [
        ("digits-mlp-64-32-5", 32, "both"),
        ("digits-mlp-64-64-5", 64, "both.digits-mlp-64-64-5"),
    ] {
        let mut task = descriptor();
        task.architecture = architecture.into();
        // The second row may load a moment after the first.
        let answer = generate_once_loaded(&mut client, &task).await;
        assert_eq!(answer.denoiser, id);
        let file = safetensors::SafeTensors::deserialize(&answer.files[0]).unwrap();
        assert_eq!(file.tensor("0.weight").unwrap().shape(), [hidden, 64]);
        assert_eq!(file.tensor("2.weight").unwrap().shape(), [5, hidden]);
    }
    // A width between them, never trained on, gets a row of its own; a CNN
    // does not fit two MLPs' union, and neither does an unknown name.
    for (architecture, reason) in [
        ("digits-cnn-8-16-5", "fits none of the union"),
        (
            "nonexistent-arch",
            "\"nonexistent-arch\" is neither registered nor built in",
        ),
    ] {
        let text = worker_refused(
            &data,
            &[
                "add-architecture",
                "--denoiser-id",
                "both.digits-mlp-64-64-5",
                "--architecture",
                architecture,
            ],
        );
        assert!(
            text.contains("architecture:") && text.contains(reason),
            "{text}"
        );
    }
    let added = worker(
        &data,
        &[
            "add-architecture",
            "--denoiser-id",
            "both.digits-mlp-64-64-5",
            "--architecture",
            "digits-mlp-64-48-5",
            "--activate",
        ],
    );
    assert!(
        added.contains("published denoiser both.digits-mlp-64-48-5 (digits-mlp-64-48-5, active)"),
        "{added}"
    );
    let unseen = catalog
        .denoiser("both.digits-mlp-64-48-5")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unseen.sha256, narrow.sha256, "the same checkpoint");
    assert_eq!(
        unseen.summary[weightgen::train::UNSEEN_ARCHITECTURE_KEY],
        1.0
    );
    assert!(!unseen.summary.keys().any(|k| k.starts_with("quality.")));
    let mut task = descriptor();
    task.architecture = "digits-mlp-64-48-5".into();
    // Loaded at the next reload check.
    let answer = generate_once_loaded(&mut client, &task).await;
    assert_eq!(answer.denoiser, "both.digits-mlp-64-48-5");
    let file = safetensors::SafeTensors::deserialize(&answer.files[0]).unwrap();
    assert_eq!(file.tensor("0.weight").unwrap().shape(), [48, 64]);
    assert_eq!(file.tensor("2.weight").unwrap().shape(), [5, 48]);
}

/// The same union through the job queue: a `TrainDenoiser` job naming
/// `also_zoos` is refused at submission without a weight-space latent (by
/// field), and accepted with one; a `weightgen-worker run` takes it and
/// publishes a row per architecture on one blob, both active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_union_trains_through_the_job_queue() {
    use weightgen::proto::v1::job_service_client::JobServiceClient;
    use weightgen::proto::v1::{
        GetJobRequest, JobState, LatentSpace, SubmitJobRequest, TrainDenoiserSpec,
        submit_job_request::Spec,
    };
    let server = spawn_server(|_| {}).await;
    let data = server.data_dir.path().join("data");
    zoo(&data, "narrow", "digits-mlp-64-32-5");
    zoo(&data, "wide", "digits-mlp-64-64-5");
    let spec = |latent: LatentSpace| {
        Spec::TrainDenoiser(TrainDenoiserSpec {
            zoo: "narrow".into(),
            also_zoos: vec!["wide".into()],
            latent: latent.into(),
            denoiser_id: "queued".into(),
            steps: Some(30),
            learning_rate: Some(1e-3),
            widths: vec![64, 32],
            eval_tasks: Some(2),
            log_every: Some(100),
            activate: true,
            ..Default::default()
        })
    };
    let mut jobs = JobServiceClient::new(server.channel().await);
    let submit = |latent| SubmitJobRequest {
        spec: Some(spec(latent)),
        max_attempts: 1,
        idempotency_key: String::new(),
    };
    let refused = jobs.submit_job(submit(LatentSpace::Pca)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("train_denoiser.also_zoos:"),
        "{}",
        refused.message()
    );
    let job = jobs
        .submit_job(submit(LatentSpace::Weights))
        .await
        .unwrap()
        .into_inner();
    let out = worker(
        &data,
        &[
            "run",
            "--worker-id",
            "union-worker",
            "--device",
            "cpu",
            "--exit-when-idle",
        ],
    );
    assert!(out.contains("jobs: 1 succeeded, 0 failed"), "{out}");
    let done = jobs
        .get_job(GetJobRequest { id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), JobState::Succeeded, "{}", done.error);
    let (_, narrow, wide) = active_rows(&data).await;
    assert_eq!(
        (narrow.id.as_str(), wide.id.as_str()),
        ("queued", "queued.digits-mlp-64-64-5")
    );
    assert_eq!(narrow.sha256, wide.sha256, "one checkpoint");
}
