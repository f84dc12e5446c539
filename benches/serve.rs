//! GenerateInit under load, end to end over gRPC on loopback: latency p50 /
//! p99 and throughput for DDIM-50 and DDPM-1000 at 1, 8 and 64 concurrent
//! single-sample clients, one request of 64 samples for comparison (the
//! batching target: 64 concurrent clients reach ≥ 0.8 of it), and the
//! server's resident memory across many requests. Prints a Markdown table
//! (docs/BENCHMARKS.md). Run through `scripts/bench-serve.sh`.
//!
//! The denoiser is the demo's size (MLP U-Net 256/128 on the digits MLP,
//! D = 2,245), trained for a few steps only: speed does not depend on how
//! well it was trained. `WEIGHTGEN_BENCH_REQUESTS` sets the memory run's
//! request count (default 10,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::Device;
use tokio_stream::StreamExt;
use weightgen::model::{FitConfig, MlpUnetConfig, NetConfig};
use weightgen::proto::v1::generation_service_client::GenerationServiceClient;
use weightgen::proto::v1::{
    FeatureValue, GenerateInitRequest, Sampler, SamplingOptions, TaskDescriptor,
    generate_init_response::Part,
};
use weightgen::serve::{self, MetricsListen, ServerConfig};
use weightgen::storage::StorageArgs;
use weightgen::tasks::families::TaskSpec;
use weightgen::tasks::featurizer::describe;
use weightgen::tasks::{Family, TrainConfig};
use weightgen::train::{TrainDenoiserConfig, train_denoiser};
use weightgen::zoo::{ZooBuildConfig, build_zoo};

type Client = GenerationServiceClient<tonic::transport::Channel>;
/// A sampler, its name, and (clients, samples per request, requests) runs.
type Plan = (Sampler, &'static str, [(usize, u32, usize); 4]);

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn prepare(dir: &std::path::Path) {
    let (catalog, blobs) = StorageArgs::embedded(dir).open().await.unwrap();
    let zoo = ZooBuildConfig {
        zoo: "digits".into(),
        family: Family::Digits,
        architecture: String::new(),
        num_models: 40,
        seed: 1,
        shared_init: true,
        train: TrainConfig {
            steps: 30,
            ..Family::Digits.train_config()
        },
        worker: "bench".into(),
        jobs: 2,
        lease: Duration::from_secs(600),
        device: Device::Cpu,
        max_models: None,
        cancel: Default::default(),
        words_base: Default::default(),
    };
    build_zoo(catalog.clone(), blobs.clone(), zoo, |_| {})
        .await
        .unwrap();
    let config = TrainDenoiserConfig {
        zoo: "digits".into(),
        also_zoos: Vec::new(),
        denoiser_id: "bench".into(),
        architecture: None,
        net: NetConfig::MlpUnet(MlpUnetConfig {
            widths: vec![256, 128],
            ..Default::default()
        }),
        timesteps: weightgen::diffusion::schedule::DEFAULT_TIMESTEPS,
        // The weights themselves, as the figures in BENCHMARKS.md were measured.
        latent: weightgen::train::LatentChoice::None,
        latent_steps: weightgen::model::weight_autoencoder::DEFAULT_AE_STEPS,
        schedule: weightgen::diffusion::schedule::ScheduleKind::cosine(),
        prediction: Default::default(),
        load: Default::default(),
        fit: FitConfig {
            steps: 50,
            ..Default::default()
        },
        ema_decay: 0.99,
        val_fraction: 0.1,
        encoder_hidden: 128,
        embed_dim: 64,
        log_every: 50,
        eval_tasks: 1,
        eval_guidance: 1.0,
        device: Device::Cpu,
        activate: true,
        checkpoint_every: 0,
        resume: false,
        cancel: Default::default(),
    };
    train_denoiser(catalog, blobs, config, |_, _, _| {})
        .await
        .unwrap();
}

fn task() -> TaskDescriptor {
    let task = TaskSpec::Digits {
        classes: vec![0, 1, 2, 3, 4],
    };
    let data = Family::Digits.data(&task, Device::Cpu).unwrap();
    let d = describe(Family::Digits, &task, &data);
    TaskDescriptor {
        architecture: "digits-mlp-64-32-5".into(),
        features: d
            .features
            .into_iter()
            .map(|(k, values)| (k, FeatureValue { values }))
            .collect(),
        num_classes: 5,
        ..Default::default()
    }
}

async fn call(
    client: &mut Client,
    task: &TaskDescriptor,
    sampler: Sampler,
    samples: u32,
    seed: u64,
) -> u32 {
    // DDIM-50, as BENCHMARKS.md's figures are labelled (the server's
    // default is 10); DDPM runs all T.
    let steps = if sampler == Sampler::Ddim { 50 } else { 0 };
    call_steps(client, task, sampler, steps, samples, seed).await
}

async fn call_steps(
    client: &mut Client,
    task: &TaskDescriptor,
    sampler: Sampler,
    steps: u32,
    samples: u32,
    seed: u64,
) -> u32 {
    let mut stream = client
        .generate_init(GenerateInitRequest {
            task: Some(task.clone()),
            options: Some(SamplingOptions {
                num_samples: samples,
                sampler: sampler as i32,
                steps,
                seed: Some(seed),
                ..Default::default()
            }),
            denoiser_id: String::new(),
        })
        .await
        .expect("GenerateInit")
        .into_inner();
    let mut batch_size = 0;
    while let Some(m) = stream.next().await {
        if let Some(Part::Trailer(t)) = m.expect("stream").part {
            batch_size = t.batch_size;
        }
    }
    batch_size
}

struct Measured {
    p50_ms: f64,
    p99_ms: f64,
    samples_per_s: f64,
    /// Mean samples in the reverse diffusion that served a request.
    mean_batch: f64,
}

/// `clients` concurrent clients, each sending `per_client` requests of
/// `samples` samples back to back.
async fn run(
    addr: &str,
    task: &TaskDescriptor,
    sampler: Sampler,
    clients: usize,
    per_client: usize,
    samples: u32,
) -> Measured {
    let began = Instant::now();
    let mut handles = Vec::new();
    for c in 0..clients {
        let channel = weightgen::client::connect(addr, Some(Duration::from_secs(600)))
            .await
            .unwrap();
        let task = task.clone();
        handles.push(tokio::spawn(async move {
            let mut client = Client::new(channel);
            let mut latencies = Vec::with_capacity(per_client);
            let mut batches = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let start = Instant::now();
                let batch = call(
                    &mut client,
                    &task,
                    sampler,
                    samples,
                    (c * 100_000 + i) as u64,
                )
                .await;
                latencies.push(start.elapsed().as_secs_f64() * 1e3);
                batches.push(f64::from(batch));
            }
            (latencies, batches)
        }));
    }
    let mut latencies = Vec::new();
    let mut batches = Vec::new();
    for h in handles {
        let (l, b) = h.await.unwrap();
        latencies.extend(l);
        batches.extend(b);
    }
    let seconds = began.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    Measured {
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        samples_per_s: (clients * per_client) as f64 * f64::from(samples) / seconds,
        mean_batch: batches.iter().sum::<f64>() / batches.len().max(1) as f64,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path()).await;
    let task = task();
    let mut config = ServerConfig::with_defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.metrics_listen = MetricsListen(None);
    config.storage = StorageArgs::embedded(dir.path());
    config.device = weightgen::device::DeviceChoice::Cpu;
    config.max_concurrent_requests = 1024;
    let server = serve::start(config).await.unwrap();
    let addr = server.grpc_addr().to_string();
    weightgen::client::wait_until_serving(
        &weightgen::client::Target::new(addr.clone()),
        "weightgen.v1.GenerationService",
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    println!(
        "| sampler | clients × samples | requests | p50 latency | p99 latency | throughput | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut results = std::collections::HashMap::new();
    // (clients, samples per request, requests) per sampler: the concurrent
    // runs send several rounds so batches form in steady state.
    let plans: [Plan; 2] = [
        (
            Sampler::Ddim,
            "DDIM-50",
            [(1, 1, 64), (8, 1, 64), (64, 1, 256), (1, 64, 16)],
        ),
        (
            Sampler::Ddpm,
            "DDPM-1000",
            [(1, 1, 4), (8, 1, 16), (64, 1, 192), (1, 64, 3)],
        ),
    ];
    for (sampler, name, runs) in plans {
        for (clients, samples, requests) in runs {
            let per_client = (requests / clients).max(1);
            let m = run(&addr, &task, sampler, clients, per_client, samples).await;
            println!(
                "| {name} | {clients} × {samples} | {} | {:.0} ms | {:.0} ms | {:.1} samples/s | {:.1} |",
                clients * per_client,
                m.p50_ms,
                m.p99_ms,
                m.samples_per_s,
                m.mean_batch
            );
            results.insert((name, clients, samples), m.samples_per_s);
        }
    }
    for name in ["DDIM-50", "DDPM-1000"] {
        let one = results[&(name, 1, 1)];
        let many = results[&(name, 64, 1)];
        let batch = results[&(name, 1, 64)];
        println!(
            "{name}: batching gain (64 clients ÷ 1 client) {:.1}×; 64 clients ÷ one 64-sample request {:.2}",
            many / one,
            many / batch
        );
    }
    // Head-of-line blocking: a DDIM-10 single-sample request on an idle
    // server, and while a DDPM-1000 × 64 request runs (issue 18: ≤ 3×).
    let channel = weightgen::client::connect(&addr, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    let mut client = Client::new(channel);
    async fn median_ms(client: &mut Client, task: &TaskDescriptor, rounds: u64) -> f64 {
        let mut ms = Vec::new();
        for seed in 0..rounds {
            let start = Instant::now();
            call_steps(client, task, Sampler::Ddim, 10, 1, 900 + seed).await;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        ms[ms.len() / 2]
    }
    let idle = median_ms(&mut client, &task, 7).await;
    let long = {
        let mut client = client.clone();
        let task = task.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            call(&mut client, &task, Sampler::Ddpm, 64, 7).await;
            start.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = median_ms(&mut client, &task, 7).await;
    let long = long.await.unwrap();
    println!(
        "head-of-line: DDIM-10 × 1 median {idle:.1} ms on an idle server, {busy:.1} ms while a DDPM-1000 × 64 request runs ({:.2}×; that request took {:.1} s)",
        busy / idle,
        long.as_secs_f64()
    );
    // Memory: the server's process (this one) across many requests.
    let requests: usize = std::env::var("WEIGHTGEN_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let warm = rss_mib();
    let began = Instant::now();
    let m = Arc::new(run(&addr, &task, Sampler::Ddim, 64, requests / 64, 1).await);
    println!(
        "memory: RSS {warm:.0} MiB after warm-up, {:.0} MiB after {} more DDIM-50 requests from 64 clients ({:.0} s, {:.1} samples/s)",
        rss_mib(),
        (requests / 64) * 64,
        began.elapsed().as_secs_f64(),
        m.samples_per_s
    );
    server.shutdown().await.unwrap();
}
