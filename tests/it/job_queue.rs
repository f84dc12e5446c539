//! The job queue end to end: jobs submitted over gRPC, consumed by real
//! `weightgen-worker run` processes sharing the server's catalog. A worker
//! SIGKILLed mid-training loses its lease and the next worker resumes the
//! job from its checkpoint; failing jobs are retried up to their limit with
//! the reason recorded; a cancelled job stops its worker; bad specs are
//! refused at submission, naming the field.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TestServer, combined_output, spawn_server};
use tonic::Code;
use weightgen::proto::v1::job_service_client::JobServiceClient;
use weightgen::proto::v1::{
    BuildZooSpec, CancelJobRequest, GetJobRequest, Job, JobState, ListJobsRequest,
    SubmitJobRequest, TrainDenoiserSpec, submit_job_request::Spec,
};

const WORKER: &str = env!("CARGO_BIN_EXE_weightgen-worker");

fn data_dir(test: &TestServer) -> PathBuf {
    test.data_dir.path().join("data")
}

fn worker(data: &Path, id: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(WORKER);
    command
        .args(["--log-format", "json", "run", "--worker-id", id])
        .args(["--lease", "3s", "--poll", "200ms", "--device", "cpu"])
        .args(extra)
        .env("WEIGHTGEN_DATA_DIR", data);
    command
}

fn spawn_quiet(mut command: Command) -> Child {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn finished(output: Output) -> String {
    let text = combined_output(&output);
    assert!(output.status.success(), "{text}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn submit(
    client: &mut JobServiceClient<tonic::transport::Channel>,
    spec: Spec,
    max_attempts: u32,
) -> Job {
    client
        .submit_job(SubmitJobRequest {
            spec: Some(spec),
            max_attempts,
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn get(client: &mut JobServiceClient<tonic::transport::Channel>, id: &str) -> Job {
    client
        .get_job(GetJobRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
}

fn train_spec(zoo: &str, steps: u32, checkpoint_every: u32) -> Spec {
    Spec::TrainDenoiser(TrainDenoiserSpec {
        zoo: zoo.to_owned(),
        steps: Some(steps),
        learning_rate: Some(1e-3),
        seed: 4,
        activate: true,
        widths: vec![64, 32],
        checkpoint_every: Some(checkpoint_every),
        log_every: Some(100),
        eval_tasks: Some(2),
        ..Default::default()
    })
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (30 s here): waits out a lease and trains; scripts/test.sh runs it"]
async fn a_dead_workers_job_is_taken_over_after_its_lease_and_resumed() {
    let test = spawn_server(|_| {}).await;
    let data = data_dir(&test);
    let mut jobs = JobServiceClient::new(test.channel().await);
    let zoo_job = submit(
        &mut jobs,
        Spec::BuildZoo(BuildZooSpec {
            family: "digits".into(),
            num_models: 40,
            shared_init: true,
            steps: Some(30),
            ..Default::default()
        }),
        1,
    )
    .await;
    let train_job = submit(&mut jobs, train_spec("digits", 600, 100), 3).await;
    assert_eq!(train_job.state(), JobState::Queued);

    // Worker A builds the zoo, starts training, and is killed once the run
    // has a checkpoint.
    let mut a = spawn_quiet(worker(&data, "worker-a", &[]));
    let denoiser_id = format!("digits-{}", train_job.id);
    let pointer = data.join(format!("blobs/named/training/{denoiser_id}/state"));
    wait_for(
        "worker A's first training checkpoint",
        Duration::from_secs(300),
        || {
            assert!(a.try_wait().unwrap().is_none(), "worker A exited early");
            pointer.exists()
        },
    );
    a.kill().unwrap();
    a.wait().unwrap();
    let zoo = get(&mut jobs, &zoo_job.id).await;
    assert_eq!(
        (zoo.state(), zoo.models_built, zoo.worker_id.as_str()),
        (JobState::Succeeded, 40, "worker-a")
    );
    let held = get(&mut jobs, &train_job.id).await;
    assert_eq!(
        (held.state(), held.attempts, held.worker_id.as_str()),
        (JobState::Running, 1, "worker-a")
    );

    // Worker B waits out A's lease, takes the job over, resumes it and
    // exits when the queue is empty.
    let b = finished(
        worker(&data, "worker-b", &["--exit-when-idle"])
            .output()
            .unwrap(),
    );
    assert!(
        b.contains("jobs: 1 succeeded, 0 failed, 0 abandoned"),
        "{b}"
    );
    let done = get(&mut jobs, &train_job.id).await;
    assert_eq!(
        (
            done.state(),
            done.attempts,
            done.worker_id.as_str(),
            done.denoiser_id.as_str(),
            done.progress
        ),
        (
            JobState::Succeeded,
            2,
            "worker-b",
            denoiser_id.as_str(),
            1.0
        )
    );
    let active = test
        .server
        .catalog()
        .active_denoiser("digits-mlp-64-32-5")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(active.id, denoiser_id);
    // The published run carries its full loss curve (steps before and
    // after the kill).
    let metrics = test
        .server
        .blobs()
        .get_named(&format!("training/{denoiser_id}/metrics.json"))
        .await
        .unwrap()
        .unwrap();
    let metrics: serde_json::Value = serde_json::from_slice(&metrics).unwrap();
    assert_eq!(metrics["curve"].as_array().unwrap().len(), 6);
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_to_their_limit_and_cancelled_jobs_stop_their_worker() {
    let test = spawn_server(|_| {}).await;
    let data = data_dir(&test);
    let mut jobs = JobServiceClient::new(test.channel().await);

    // Bad specs are refused at once, naming the field.
    for (spec, field) in [
        (None, "spec"),
        (
            Some(Spec::BuildZoo(BuildZooSpec {
                family: "cifar".into(),
                num_models: 3,
                ..Default::default()
            })),
            "build_zoo.family",
        ),
        (
            Some(Spec::BuildZoo(BuildZooSpec {
                family: "digits".into(),
                ..Default::default()
            })),
            "build_zoo.num_models",
        ),
        (Some(train_spec("", 10, 0)), "train_denoiser.zoo"),
        (
            Some(Spec::TrainDenoiser(TrainDenoiserSpec {
                zoo: "z".into(),
                steps: Some(0),
                ..Default::default()
            })),
            "train_denoiser.steps",
        ),
        (
            Some(Spec::TrainDenoiser(TrainDenoiserSpec {
                zoo: "z".into(),
                kind: 7,
                ..Default::default()
            })),
            "train_denoiser.kind",
        ),
        (
            Some(Spec::TrainDenoiser(TrainDenoiserSpec {
                zoo: "z".into(),
                feature_dropout: Some(0.6),
                support_dropout: Some(0.6),
                ..Default::default()
            })),
            "train_denoiser.support_dropout",
        ),
    ] {
        let err = jobs
            .submit_job(SubmitJobRequest {
                spec,
                max_attempts: 0,
                idempotency_key: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{}",
            err.message()
        );
    }
    let err = jobs
        .get_job(GetJobRequest {
            id: "job-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Resubmitting with the same idempotency key returns the same job.
    let request = SubmitJobRequest {
        spec: Some(train_spec("no-such-zoo", 10, 0)),
        max_attempts: 2,
        idempotency_key: "retry-me".into(),
    };
    let failing = jobs.submit_job(request.clone()).await.unwrap().into_inner();
    let again = jobs.submit_job(request).await.unwrap().into_inner();
    assert_eq!(failing.id, again.id);
    assert_eq!(failing.max_attempts, 2);

    // A job that cannot succeed is tried twice, then fails with its reason.
    let out = finished(
        worker(&data, "worker-f", &["--exit-when-idle"])
            .output()
            .unwrap(),
    );
    assert!(
        out.contains("jobs: 0 succeeded, 2 failed, 0 abandoned"),
        "{out}"
    );
    let failed = get(&mut jobs, &failing.id).await;
    assert_eq!((failed.state(), failed.attempts), (JobState::Failed, 2));
    assert!(failed.error.contains("no-such-zoo"), "{}", failed.error);
    assert!(failed.finished_at.is_some());

    // A long job cancelled while it runs: its worker stops at the next
    // heartbeat and does not finish it.
    let zoo = submit(
        &mut jobs,
        Spec::BuildZoo(BuildZooSpec {
            family: "sinusoid".into(),
            num_models: 10,
            steps: Some(20),
            ..Default::default()
        }),
        1,
    )
    .await;
    let long = submit(&mut jobs, train_spec("sinusoid", 1_000_000, 0), 1).await;
    let child = worker(&data, "worker-c", &["--exit-when-idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let job = get(&mut jobs, &long.id).await;
        if job.state() == JobState::Running {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "long job never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancelled = jobs
        .cancel_job(CancelJobRequest {
            id: long.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    let out = finished(
        tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap(),
    );
    assert!(
        out.contains("jobs: 1 succeeded, 0 failed, 1 abandoned"),
        "{out}"
    );
    assert_eq!(get(&mut jobs, &long.id).await.state(), JobState::Cancelled);
    assert_eq!(get(&mut jobs, &zoo.id).await.state(), JobState::Succeeded);

    // Listing: filtered by state, newest first.
    let listed = jobs
        .list_jobs(ListJobsRequest {
            state: JobState::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .jobs
            .iter()
            .map(|j| j.id.as_str())
            .collect::<Vec<_>>(),
        [failing.id.as_str()]
    );
    let all = jobs
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.jobs.len(), 3);
    assert_eq!(all.jobs[0].id, long.id);
    test.server.shutdown().await.unwrap();
}
