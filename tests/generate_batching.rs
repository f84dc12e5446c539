//! The batcher: concurrent GenerateInit calls are merged into shared
//! reverse diffusions without changing anyone's bytes; a full queue answers
//! RESOURCE_EXHAUSTED at once and the server keeps serving; a call past its
//! deadline (the client's or the server's) is answered DEADLINE_EXCEEDED and
//! its queued work is dropped.

mod common;

use std::time::Duration;

use common::generation::{
    Client, descriptor, generate_with, request, small_digits_zoo, train, wait_ready,
};
use common::{metric_value, spawn_server};
use tonic::Code;
use weightgen::proto::v1::Sampler;

/// Largest absolute difference between two f32 safetensors files with the
/// same tensors.
fn max_difference(a: &[u8], b: &[u8]) -> f32 {
    let (a, b) = (
        safetensors::SafeTensors::deserialize(a).unwrap(),
        safetensors::SafeTensors::deserialize(b).unwrap(),
    );
    let mut worst = 0.0f32;
    for name in a.names() {
        let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(x.shape(), y.shape());
        for (p, q) in x.data().chunks_exact(4).zip(y.data().chunks_exact(4)) {
            let p = f32::from_le_bytes(p.try_into().unwrap());
            let q = f32::from_le_bytes(q.try_into().unwrap());
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

fn histogram_count(text: &str, name: &str) -> f64 {
    metric_value(text, &format!("{name}_count"), &[]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_batches_overload_is_refused_and_cancelled_work_dropped() {
    // Two servers on one data dir: a batching one, and one with a tiny queue.
    let batching = spawn_server(|c| {
        c.max_wait = Duration::from_millis(100);
        c.reload_interval = Duration::from_millis(100);
        // The 32-sample DDPM-1000 request below runs for tens of seconds on
        // a loaded debug build; the default 60 s limit is for clients.
        c.request_timeout = Duration::from_secs(600);
    })
    .await;
    let data = batching.data_dir.path().join("data");
    small_digits_zoo(&data);
    let out = train(&data, "digits-b1", "1");
    assert!(out.contains("published denoiser digits-b1"), "{out}");
    let task = descriptor();
    let mut client = Client::new(batching.channel().await);
    wait_ready(&mut client).await;

    // Alone, then among 64 concurrent single-sample calls: the same bytes.
    let alone = generate_with(&mut client, request(&task, Sampler::Ddim, 1, 123))
        .await
        .unwrap();
    assert_eq!(alone.trailer.batch_size, 1);
    let before = batching.metrics().await;
    let mut calls = Vec::new();
    for seed in 100..164u64 {
        let (mut client, task) = (Client::new(batching.channel().await), task.clone());
        calls.push(tokio::spawn(async move {
            generate_with(&mut client, request(&task, Sampler::Ddim, 1, seed)).await
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap().expect("every concurrent call succeeds"));
    }
    // Batched, seed 123 draws the same noise; only the matrix products run
    // at another batch size, which may round differently in the last bits.
    let difference = max_difference(&answers[23].files[0], &alone.files[0]);
    eprintln!("seed 123 alone vs batched: max |Δw| = {difference:e}");
    assert!(
        difference < 1e-4,
        "seed 123 changed when batched: {difference}"
    );
    let largest = answers.iter().map(|a| a.trailer.batch_size).max().unwrap();
    assert!(largest > 1, "no call was batched with another");
    let after = batching.metrics().await;
    let batches = histogram_count(&after, "weightgen_batch_samples")
        - histogram_count(&before, "weightgen_batch_samples");
    eprintln!("64 concurrent calls ran in {batches} batches (largest {largest})");
    assert!(batches < 64.0, "{batches} batches for 64 calls");

    // The CLI asks for the same thing alone and writes the same bytes.
    let out_file = batching.data_dir.path().join("init.safetensors");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_weightgen"));
    command.args([
        "--addr",
        &batching.addr(),
        "generate",
        "--architecture",
        &task.architecture,
    ]);
    for (name, value) in &task.features {
        let values: Vec<String> = value.values.iter().map(|v| v.to_string()).collect();
        command
            .arg("--feature")
            .arg(format!("{name}={}", values.join(",")));
    }
    command
        .args(["--num-classes", "5", "--seed", "123", "-o"])
        .arg(&out_file);
    let output = command.output().unwrap();
    let text = common::combined_output(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("denoiser digits-b1 v1") && text.contains("seed 123"),
        "{text}"
    );
    assert_eq!(std::fs::read(&out_file).unwrap(), alone.files[0]);
    // A bad feature is refused by the server, naming it.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_weightgen"))
        .args([
            "--addr",
            &batching.addr(),
            "generate",
            "--architecture",
            &task.architecture,
        ])
        .args(["--feature", "colour=1", "-o"])
        .arg(&out_file)
        .output()
        .unwrap();
    let text = common::combined_output(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("InvalidArgument: task.features.colour: unknown feature"),
        "{text}"
    );

    // A client that gives up while queued behind a long batch: its work is
    // dropped, not computed.
    let dropped_before =
        metric_value(&after, "weightgen_generate_dropped_total", &[]).unwrap_or(0.0);
    let long = {
        let (mut client, task) = (client.clone(), task.clone());
        tokio::spawn(async move {
            generate_with(&mut client, request(&task, Sampler::Ddpm, 32, 1)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for seed in 0..3u64 {
        let mut impatient = tonic::Request::new(request(&task, Sampler::Ddpm, 1, 500 + seed));
        impatient.set_timeout(Duration::from_millis(200));
        let err = client.clone().generate_init(impatient).await.unwrap_err();
        // tonic's client enforces the same grpc-timeout itself and gives up
        // first ("Timeout expired", CANCELLED); the server's own answer to a
        // deadline is checked below with --request-timeout.
        assert!(
            matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
            "{:?}: {}",
            err.code(),
            err.message()
        );
    }
    long.await.unwrap().unwrap();
    // The queued requests are dropped when the model thread reaches them.
    let _ = generate_with(&mut client, request(&task, Sampler::Ddim, 1, 9))
        .await
        .unwrap();
    let text = batching.metrics().await;
    let dropped = metric_value(&text, "weightgen_generate_dropped_total", &[]).unwrap_or(0.0)
        - dropped_before;
    assert_eq!(dropped, 3.0, "{text}");

    // A server with room for two waiting requests: a burst is refused at
    // once beyond that, and it keeps serving afterwards.
    let small = spawn_server(|c| {
        c.storage = weightgen::storage::StorageArgs::embedded(&data);
        c.max_queue = 2;
        c.max_batch = 1;
        c.max_wait = Duration::ZERO;
    })
    .await;
    let mut small_client = Client::new(small.channel().await);
    wait_ready(&mut small_client).await;
    let mut burst = Vec::new();
    for seed in 0..12u64 {
        let (mut client, task) = (small_client.clone(), task.clone());
        burst.push(tokio::spawn(async move {
            generate_with(&mut client, request(&task, Sampler::Ddpm, 1, seed)).await
        }));
    }
    let mut served = 0;
    let mut refused = 0;
    for call in burst {
        match call.await.unwrap() {
            Ok(_) => served += 1,
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "{}",
                    status.message()
                );
                assert!(
                    status.message().contains("queue is full"),
                    "{}",
                    status.message()
                );
                refused += 1;
            }
        }
    }
    eprintln!("burst of 12 on a 2-deep queue: {served} served, {refused} refused");
    assert!(
        served >= 2 && refused >= 1,
        "{served} served, {refused} refused"
    );
    generate_with(&mut small_client, request(&task, Sampler::Ddim, 1, 77))
        .await
        .expect("still serving after the burst");

    // The server's own limit: a call that cannot finish within
    // --request-timeout is answered DEADLINE_EXCEEDED naming it.
    let strict = spawn_server(|c| {
        c.storage = weightgen::storage::StorageArgs::embedded(&data);
        c.request_timeout = Duration::from_millis(500);
    })
    .await;
    let mut strict_client = Client::new(strict.channel().await);
    wait_ready(&mut strict_client).await;
    // The recorder is process-wide: the impatient calls above count too.
    let exceeded = |text: &str| metric_value(text, "weightgen_deadline_exceeded_total", &[]);
    let before = exceeded(&strict.metrics().await).unwrap_or(0.0);
    let Err(err) = generate_with(&mut strict_client, request(&task, Sampler::Ddpm, 32, 3)).await
    else {
        panic!("a 32-sample DDPM-1000 call finished within 500 ms")
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(
        err.message().contains("--request-timeout"),
        "{}",
        err.message()
    );
    let text = strict.metrics().await;
    assert_eq!(exceeded(&text), Some(before + 1.0), "{text}");
    strict.server.shutdown().await.unwrap();
    small.server.shutdown().await.unwrap();
    batching.server.shutdown().await.unwrap();
}
