//! GenerateInit as a client sees it, for tests: a small digits denoiser
//! trained by the worker binary, a task descriptor from the featurizer, and
//! a call whose streamed files are reassembled and checked.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tokio_stream::StreamExt;
use weightgen::blobs::sha256_hex;
use weightgen::proto::v1::generation_service_client::GenerationServiceClient;
use weightgen::proto::v1::{
    FeatureValue, GenerateInitRequest, GenerateInitTrailer, Sampler, SamplingOptions,
    ServerReadyRequest, TaskDescriptor, generate_init_response::Part,
};
use weightgen::tasks::families::{Family, TaskSpec};
use weightgen::tasks::featurizer::describe;

use super::combined_output;

pub const WORKER: &str = env!("CARGO_BIN_EXE_weightgen-worker");
pub const ARCH: &str = "digits-mlp-64-32-5";

pub type Client = GenerationServiceClient<tonic::transport::Channel>;

/// `weightgen-worker [PREFIX] ARGS` on `data`: its output and its stdout
/// and stderr together.
fn run_worker(data: &Path, prefix: &[&str], args: &[&str]) -> (std::process::Output, String) {
    let output = Command::new(WORKER)
        .args(prefix)
        .args(args)
        .env("WEIGHTGEN_DATA_DIR", data)
        .output()
        .unwrap();
    let text = combined_output(&output);
    (output, text)
}

pub fn worker(data: &Path, args: &[&str]) -> String {
    let (output, text) = run_worker(data, &["--log-format", "json"], args);
    assert!(output.status.success(), "{text}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `weightgen-worker ARGS` on `data` expecting it to fail; its stdout
/// and stderr.
pub fn worker_refused(data: &Path, args: &[&str]) -> String {
    let (output, text) = run_worker(data, &[], args);
    assert!(!output.status.success(), "{text}");
    text
}

/// A 40-model `digits` zoo from one shared init (30 steps each), built by
/// the worker binary into `data`.
pub fn small_digits_zoo(data: &Path) -> String {
    small_digits_zoo_with(data, &[])
}

/// [`small_digits_zoo`] with `extra` flags (e.g. another catalog).
pub fn small_digits_zoo_with(data: &Path, extra: &[&str]) -> String {
    let args = [
        "zoo",
        "build",
        "--family",
        "digits",
        "--models",
        "40",
        "--shared-init",
        "--steps",
        "30",
    ];
    worker(data, &[&args[..], extra].concat())
}

/// Trains and activates denoiser `id` on the small zoo.
pub fn train(data: &Path, id: &str, seed: &str) -> String {
    train_with(data, id, seed, &["--activate"])
}

/// Trains denoiser `id` on the small zoo with `extra` flags.
pub fn train_with(data: &Path, id: &str, seed: &str, extra: &[&str]) -> String {
    let args = [
        "train",
        "--zoo",
        "digits",
        "--denoiser-id",
        id,
        "--steps",
        "300",
        "--widths",
        "64,32",
        "--learning-rate",
        "1e-3",
        "--eval-tasks",
        "4",
        "--log-every",
        "100",
        "--seed",
        seed,
        "--device",
        "cpu",
    ];
    worker(data, &[&args[..], extra].concat())
}

/// A task descriptor of a digits task, from the featurizer.
pub fn descriptor() -> TaskDescriptor {
    let family = Family::Digits;
    let task = TaskSpec::Digits {
        classes: vec![0, 1, 2, 3, 4],
    };
    let data = family.data(&task, tch::Device::Cpu).unwrap();
    let d = describe(family, &task, &data);
    TaskDescriptor {
        architecture: ARCH.into(),
        features: d
            .features
            .into_iter()
            .map(|(k, values)| (k, FeatureValue { values }))
            .collect(),
        num_classes: 5,
        ..Default::default()
    }
}

pub struct Answer {
    pub started: Instant,
    pub finished: Instant,
    pub denoiser: String,
    pub files: Vec<Vec<u8>>,
    pub trailer: GenerateInitTrailer,
}

/// One GenerateInit call, with every file reassembled and checked against
/// the trailer's digest and the architecture's tensor names.
pub async fn generate(
    client: &mut Client,
    task: &TaskDescriptor,
    seed: u64,
) -> Result<Answer, tonic::Status> {
    generate_with(
        client,
        GenerateInitRequest {
            task: Some(task.clone()),
            options: Some(SamplingOptions {
                num_samples: 2,
                sampler: Sampler::Ddim as i32,
                steps: 100,
                seed: Some(seed),
                ..Default::default()
            }),
            denoiser_id: String::new(),
        },
    )
    .await
}

/// One GenerateInit call, with every file reassembled and checked against
/// the trailer's digest and the header's tensor names.
pub async fn generate_with(
    client: &mut Client,
    request: GenerateInitRequest,
) -> Result<Answer, tonic::Status> {
    let started = Instant::now();
    let wanted = request.options.map_or(1, |o| o.num_samples.max(1)) as usize;
    let mut stream = client.generate_init(request).await?.into_inner();
    let mut denoiser = String::new();
    let mut names = Vec::new();
    let mut files: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut trailer = None;
    while let Some(message) = stream.next().await {
        match message?.part.unwrap() {
            Part::Header(h) => {
                denoiser = h.denoiser_id;
                names = h.tensors.into_iter().map(|t| t.name).collect::<Vec<_>>();
            }
            Part::Chunk(c) => {
                let file = files.entry(c.sample_index).or_default();
                assert_eq!(c.offset as usize, file.len());
                assert!(c.data.len() <= 1 << 20);
                file.extend_from_slice(&c.data);
            }
            Part::Trailer(t) => trailer = Some(t),
        }
    }
    let trailer = trailer.expect("a trailer");
    let digests = trailer.samples.clone();
    assert_eq!(digests.len(), wanted);
    let mut out = Vec::new();
    for digest in digests {
        let file = files.remove(&digest.sample_index).unwrap();
        assert_eq!(sha256_hex(&file), digest.sha256);
        let parsed = safetensors::SafeTensors::deserialize(&file).unwrap();
        let mut stored: Vec<String> = parsed.names().into_iter().map(str::to_owned).collect();
        stored.sort();
        let mut expected = names.clone();
        expected.sort();
        assert_eq!(stored, expected);
        out.push(file);
    }
    Ok(Answer {
        started,
        finished: Instant::now(),
        denoiser,
        files: out,
        trailer,
    })
}

/// A request for `samples` samples of `task` with `sampler` and `seed`.
pub fn request(
    task: &TaskDescriptor,
    sampler: Sampler,
    samples: u32,
    seed: u64,
) -> GenerateInitRequest {
    GenerateInitRequest {
        task: Some(task.clone()),
        options: Some(SamplingOptions {
            num_samples: samples,
            sampler: sampler as i32,
            seed: Some(seed),
            ..Default::default()
        }),
        denoiser_id: String::new(),
    }
}

/// Waits until the server has a denoiser loaded (ServerReady).
pub async fn wait_ready(client: &mut Client) {
    for _ in 0..600 {
        if client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no denoiser loaded within 30 s");
}
