//! GenerateInit end to end over real gRPC with a small digits denoiser
//! trained by the worker: status codes before a denoiser exists, every
//! validation error with its code and field, files with the architecture's
//! names, shapes and dtypes, determinism by seed, the Python client (stubs
//! built from the proto at install time) loading an init strictly into a
//! PyTorch module and fine-tuning it, and `weightgen compare`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use crate::common::generation::{
    ARCH, Client, descriptor, generate_with, request, small_digits_zoo, train, wait_ready,
};
use crate::common::{combined_output, spawn_server, torch_python};
use tonic::Code;
use weightgen::client::TaskFile;
use weightgen::proto::v1::{self as pb, DType, GenerateInitRequest, Sampler};
use weightgen::tasks::{Family, TaskSpec};

const CLI: &str = env!("CARGO_BIN_EXE_weightgen");

fn task_of(r: &mut GenerateInitRequest) -> &mut pb::TaskDescriptor {
    r.task.as_mut().unwrap()
}

fn options_of(r: &mut GenerateInitRequest) -> &mut pb::SamplingOptions {
    r.options.as_mut().unwrap()
}

fn support(inputs: (Vec<u64>, Vec<f32>), targets: (Vec<u64>, Vec<f32>)) -> pb::SupportSet {
    pb::SupportSet {
        inputs: Some(pb::FloatTensor {
            shape: inputs.0,
            values: inputs.1,
        }),
        targets: Some(pb::FloatTensor {
            shape: targets.0,
            values: targets.1,
        }),
    }
}

/// The status of a call that must fail.
async fn refused(client: &mut Client, request: GenerateInitRequest) -> tonic::Status {
    match generate_with(client, request).await {
        Ok(_) => panic!("the call succeeded"),
        Err(status) => status,
    }
}

/// `weightgen doctor` against `addr`: exit code and stdout.
fn doctor(addr: &str) -> (Option<i32>, String) {
    let output = Command::new(CLI)
        .args(["--addr", addr, "doctor"])
        .output()
        .unwrap();
    (output.status.code(), combined_output(&output))
}

/// Installs clients/python into `target` the way a user would (pip builds
/// the stubs from the proto with grpcio-tools), offline.
fn install_python_client(target: &Path) {
    let output = Command::new(torch_python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "--target",
        ])
        .arg(target)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pip install clients/python (needs grpcio-tools from scripts/tools.sh):\n{}",
        combined_output(&output)
    );
}

fn run_python(site: &Path, args: &[&str]) -> String {
    let output = Command::new(torch_python())
        .args(args)
        .env("PYTHONPATH", site)
        .output()
        .unwrap();
    let text = combined_output(&output);
    assert!(output.status.success(), "python {args:?} failed:\n{text}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Tensor names, shapes and safetensors dtype names of a file.
fn layout(file: &[u8]) -> Vec<(String, Vec<usize>, String)> {
    let parsed = safetensors::SafeTensors::deserialize(file).unwrap();
    let mut out: Vec<_> = parsed
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec(), format!("{:?}", view.dtype())))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_init_end_to_end() {
    let server = spawn_server(|c| c.reload_interval = std::time::Duration::from_millis(100)).await;
    let data = server.data_dir.path().join("data");
    let task = descriptor();
    let mut client = Client::new(server.channel().await);

    // No zoo yet: the architecture is unknown. A zoo but no denoiser:
    // unavailable, not unknown.
    let status = refused(&mut client, request(&task, Sampler::Ddim, 1, 1)).await;
    assert_eq!(status.code(), Code::NotFound, "{}", status.message());
    assert!(
        status.message().starts_with("task.architecture: unknown"),
        "{}",
        status.message()
    );
    // `weightgen doctor` names what is missing: nothing is loaded, so there
    // is nothing to sample, and it exits 1.
    let (code, out) = doctor(&server.addr());
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("ok    health       SERVING")
            && out.contains("FAIL  denoiser     NOT_SERVING")
            && out.contains("ok    catalog      0 architecture(s), 0 active denoiser(s)")
            && out.contains("skip  sample       no active denoiser to sample")
            && out.contains("1 check(s) failed"),
        "{out}"
    );
    // Nothing listening: the first check fails and says why.
    let (code, out) = doctor("127.0.0.1:1");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL  connection"), "{out}");
    small_digits_zoo(&data);
    let status = refused(&mut client, request(&task, Sampler::Ddim, 1, 1)).await;
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("no denoiser is loaded"),
        "{}",
        status.message()
    );
    train(&data, "digits-e2e", "3");
    wait_ready(&mut client).await;
    // With a denoiser: every check passes, a real one-step sample included.
    let (code, out) = doctor(&server.addr());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok    denoiser     SERVING")
            && out.contains("ok    sample digits-e2e digits task")
            && out.contains("all checks passed"),
        "{out}"
    );

    // Every validation error: its code and the field it names.
    type Edit = Box<dyn Fn(&mut GenerateInitRequest)>;
    let cases: Vec<(Edit, Code, &str)> = vec![
        (
            Box::new(|r| r.task = None),
            Code::InvalidArgument,
            "task: required",
        ),
        (
            Box::new(|r| task_of(r).architecture.clear()),
            Code::InvalidArgument,
            "task.architecture: required",
        ),
        (
            Box::new(|r| task_of(r).architecture = "a".repeat(100_000)),
            Code::InvalidArgument,
            "task.architecture: 100000 characters, at most 256",
        ),
        (
            Box::new(|r| r.denoiser_id = "d".repeat(300)),
            Code::InvalidArgument,
            "denoiser_id: 300 characters, at most 256",
        ),
        (
            Box::new(|r| {
                task_of(r)
                    .features
                    .insert("f".repeat(100_000), pb::FeatureValue { values: vec![1.0] });
            }),
            Code::InvalidArgument,
            "task.features: 100000 characters, at most 256",
        ),
        (
            Box::new(|r| task_of(r).architecture = "resnet-1000".into()),
            Code::NotFound,
            "task.architecture: unknown architecture",
        ),
        (
            Box::new(|r| {
                task_of(r).features.remove("input_mean");
            }),
            Code::InvalidArgument,
            "task.features.input_mean: required and missing",
        ),
        (
            Box::new(|r| {
                task_of(r)
                    .features
                    .insert("colour".into(), pb::FeatureValue { values: vec![1.0] });
            }),
            Code::InvalidArgument,
            "task.features.colour: unknown feature",
        ),
        (
            Box::new(|r| {
                task_of(r).features.get_mut("input_std").unwrap().values = vec![f64::INFINITY];
            }),
            Code::InvalidArgument,
            "task.features.input_std: value 0 is inf, not a finite number",
        ),
        (
            Box::new(|r| {
                task_of(r).features.get_mut("input_mean").unwrap().values = vec![99.0];
            }),
            Code::InvalidArgument,
            "task.features.input_mean: value 0 is 99, outside [0, 16]",
        ),
        (
            Box::new(|r| {
                task_of(r).features.get_mut("class_one_hot").unwrap().values = vec![1.0; 3];
            }),
            Code::InvalidArgument,
            "task.features.class_one_hot: has 3 values, expected 50",
        ),
        (
            Box::new(|r| task_of(r).embedding = vec![0.5; 4]),
            Code::InvalidArgument,
            "task.embedding: has 4 values, the denoiser takes 0",
        ),
        (
            Box::new(|r| {
                task_of(r).support = Some(support(
                    (vec![2, 3], vec![1.0; 6]),
                    (vec![2], vec![0.0, 1.0]),
                ));
            }),
            Code::InvalidArgument,
            "task.support: example 0 has 3 input and 1 target values, expected 64 and 1",
        ),
        (
            Box::new(|r| {
                task_of(r).support = Some(support(
                    (vec![2, 64], vec![1.0; 100]),
                    (vec![2], vec![0.0, 1.0]),
                ));
            }),
            Code::InvalidArgument,
            "task.support.inputs: shape [2, 64] needs 128 values, got 100",
        ),
        (
            Box::new(|r| {
                task_of(r).support =
                    Some(support((vec![1, 64], vec![1.0; 64]), (vec![1], vec![7.0])));
            }),
            Code::InvalidArgument,
            "task.support: example 0 has label 7, expected 0..5",
        ),
        (
            Box::new(|r| {
                task_of(r).support =
                    Some(support((vec![2, 64], vec![1.0; 128]), (vec![1], vec![0.0])));
            }),
            Code::InvalidArgument,
            "task.support: 2 inputs and 1 targets",
        ),
        (
            Box::new(|r| options_of(r).num_samples = 65),
            Code::InvalidArgument,
            "options.num_samples: 65 is more than this server's limit of 64",
        ),
        (
            Box::new(|r| options_of(r).steps = 5000),
            Code::InvalidArgument,
            "options.steps: 5000 is more than T = 1000",
        ),
        (
            Box::new(|r| options_of(r).steps = 1),
            Code::InvalidArgument,
            "options.steps: DDIM needs at least 2 steps",
        ),
        (
            Box::new(|r| options_of(r).eta = Some(2.0)),
            Code::InvalidArgument,
            "options.eta: 2 is not in [0, 1]",
        ),
        (
            Box::new(|r| {
                options_of(r).sampler = pb::Sampler::DpmSolver as i32;
                options_of(r).eta = Some(0.5);
            }),
            Code::InvalidArgument,
            "options.eta: applies to DDIM only",
        ),
        (
            Box::new(|r| {
                options_of(r).sampler = pb::Sampler::DpmSolver as i32;
                options_of(r).steps = 1001;
            }),
            Code::InvalidArgument,
            "options.steps: 1001 is more than T = 1000",
        ),
        (
            Box::new(|r| options_of(r).guidance_scale = Some(f32::NAN)),
            Code::InvalidArgument,
            "options.guidance_scale:",
        ),
        (
            Box::new(|r| options_of(r).sampler = 9),
            Code::InvalidArgument,
            "options.sampler: unknown value 9",
        ),
        (
            Box::new(|r| options_of(r).output_dtype = 9),
            Code::InvalidArgument,
            "options.output_dtype: unknown value 9",
        ),
        (
            Box::new(|r| {
                task_of(r).num_classes = 6;
                task_of(r).support = Some(support(
                    (vec![2, 64], vec![1.0; 128]),
                    (vec![2], vec![0.0, 5.0]),
                ));
            }),
            Code::InvalidArgument,
            "task.num_classes: 6 classes; this denoiser generates 5-way classifiers",
        ),
        (
            Box::new(|r| {
                task_of(r).num_classes = u32::MAX;
                task_of(r).support =
                    Some(support((vec![1, 64], vec![1.0; 64]), (vec![1], vec![0.0])));
            }),
            Code::InvalidArgument,
            "task.num_classes: 4294967295 classes",
        ),
        (
            Box::new(|r| {
                let mut pixels = vec![1.0; 64];
                pixels[3] = 1e25;
                task_of(r).support = Some(support((vec![1, 64], pixels), (vec![1], vec![0.0])));
            }),
            Code::InvalidArgument,
            "task.support: example 0 holds 10000000000000000000000000, outside [-10000, 10000]",
        ),
        (
            Box::new(|r| {
                options_of(r).sampler = Sampler::Ddpm as i32;
                options_of(r).guidance_scale = Some(1e30);
            }),
            Code::InvalidArgument,
            "options.guidance_scale: 10000000150474662",
        ),
        (
            Box::new(|r| {
                task_of(r).support = Some(support(
                    (vec![1 << 32, 1 << 32], vec![]),
                    (vec![1], vec![0.0]),
                ));
            }),
            Code::InvalidArgument,
            "task.support.inputs: shape [4294967296, 4294967296] is too large",
        ),
        (
            Box::new(|r| {
                task_of(r).support = Some(support(
                    (vec![8, (1 << 61) + 64], vec![1.0; 512]),
                    (vec![8], vec![0.0; 8]),
                ));
            }),
            Code::InvalidArgument,
            "task.support.inputs: shape [8, 2305843009213694016] is too large",
        ),
        (
            Box::new(|r| options_of(r).max_redraws = 9),
            Code::InvalidArgument,
            "options.max_redraws: 9 is more than 8",
        ),
        (
            Box::new(|r| r.denoiser_id = "digits-v99".into()),
            Code::NotFound,
            "denoiser_id: \"digits-v99\" is not loaded",
        ),
    ];
    for (edit, code, message) in &cases {
        let mut bad = request(&task, Sampler::Ddim, 1, 1);
        edit(&mut bad);
        let status = refused(&mut client, bad).await;
        assert_eq!(status.code(), *code, "{message}: got {}", status.message());
        assert!(
            status.message().starts_with(message),
            "expected {message:?}, got {:?}",
            status.message()
        );
    }

    // Files: the architecture's names and shapes in the asked dtype.
    let net = Family::Digits.network(ARCH).unwrap();
    let expected = |dtype: &str| {
        let mut v: Vec<_> = net
            .spec
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), dtype.to_owned()))
            .collect();
        v.sort();
        v
    };
    for (dtype, name) in [
        (DType::DtypeF32, "F32"),
        (DType::DtypeF16, "F16"),
        (DType::DtypeBf16, "BF16"),
    ] {
        let mut asked = request(&task, Sampler::Ddim, 2, 11);
        asked.options.as_mut().unwrap().output_dtype = dtype as i32;
        let answer = generate_with(&mut client, asked).await.unwrap();
        assert_eq!(answer.denoiser, "digits-e2e");
        for file in &answer.files {
            assert_eq!(layout(file), expected(name));
        }
    }

    // Determinism: same request and seed, same bytes; another seed, other
    // bytes; sample i of a multi-sample call is seed + i alone, byte for
    // byte.
    let first = generate_with(&mut client, request(&task, Sampler::Ddim, 1, 42))
        .await
        .unwrap();
    let again = generate_with(&mut client, request(&task, Sampler::Ddim, 1, 42))
        .await
        .unwrap();
    assert_eq!(first.files, again.files);
    assert_eq!(
        first.trailer.samples[0].sha256,
        again.trailer.samples[0].sha256
    );
    let other = generate_with(&mut client, request(&task, Sampler::Ddim, 1, 43))
        .await
        .unwrap();
    assert_ne!(first.files, other.files);
    let three = generate_with(&mut client, request(&task, Sampler::Ddim, 3, 41))
        .await
        .unwrap();
    assert_eq!(three.files[1], first.files[0]);
    assert_eq!(three.files[2], other.files[0]);
    // Provenance in every file's header: enough to regenerate it.
    let meta = |file: &[u8]| {
        let (_, header) = safetensors::SafeTensors::read_metadata(file).unwrap();
        header.metadata().clone().unwrap_or_default()
    };
    let provenance = meta(&three.files[2]);
    for (key, value) in [
        ("format", "pt"),
        ("weightgen.denoiser_id", "digits-e2e"),
        ("weightgen.architecture", ARCH),
        ("weightgen.seed", "43"),
        ("weightgen.redraws", "0"),
        ("weightgen.sampler", "ddim"),
        ("weightgen.eta", "0"),
        ("weightgen.dtype", "f32"),
    ] {
        assert_eq!(
            provenance.get(key).map(String::as_str),
            Some(value),
            "{key}: {provenance:?}"
        );
    }
    let number = |key: &str| provenance[key].parse::<f64>().unwrap();
    assert!((1.0..=1000.0).contains(&number("weightgen.steps")));
    assert!(number("weightgen.guidance") >= 1.0);
    assert!(number("weightgen.denoiser_version") >= 1.0);
    let digest = &provenance["weightgen.task_sha256"];
    assert!(digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(meta(&first.files[0])["weightgen.task_sha256"], *digest);
    let mut other_task = request(&task, Sampler::Ddim, 1, 43);
    task_of(&mut other_task)
        .features
        .get_mut("input_mean")
        .unwrap()
        .values = vec![5.0];
    let other_task = generate_with(&mut client, other_task).await.unwrap();
    assert_ne!(meta(&other_task.files[0])["weightgen.task_sha256"], *digest);
    let ddpm = generate_with(&mut client, request(&task, Sampler::Ddpm, 1, 42))
        .await
        .unwrap();
    let ddpm_again = generate_with(&mut client, request(&task, Sampler::Ddpm, 1, 42))
        .await
        .unwrap();
    assert_eq!(ddpm.files, ddpm_again.files);
    // DPM-Solver++(2M), 10 steps by default: deterministic too, and its
    // own sample (a different solver from the same noise).
    let dpm = generate_with(&mut client, request(&task, Sampler::DpmSolver, 1, 42))
        .await
        .unwrap();
    let dpm_again = generate_with(&mut client, request(&task, Sampler::DpmSolver, 1, 42))
        .await
        .unwrap();
    assert_eq!(dpm.files, dpm_again.files);
    assert_ne!(dpm.files, first.files);

    // The memorization guard: every sample carries its nearness to the
    // training zoo, judged by the zoo's own spread (a zoo model's leave-one-
    // out neighbour); asking for redraws keeps answers deterministic, and a
    // sample is redrawn only while it is too close, at most max_redraws times.
    let spread = first
        .trailer
        .zoo_spread
        .expect("a zoo spread in the trailer");
    assert!(spread.reference_models >= 2 && (spread.quantile - 0.95).abs() < 1e-6);
    assert!(spread.mean_cosine <= spread.too_close_cosine && spread.too_close_cosine <= 1.0);
    assert!(spread.too_close_l2 > 0.0);
    let mut guarded = request(&task, Sampler::Ddim, 8, 500);
    options_of(&mut guarded).max_redraws = 3;
    let guarded_answer = generate_with(&mut client, guarded.clone()).await.unwrap();
    let guarded_again = generate_with(&mut client, guarded).await.unwrap();
    assert_eq!(guarded_answer.files, guarded_again.files);
    let plain = generate_with(&mut client, request(&task, Sampler::Ddim, 8, 500))
        .await
        .unwrap();
    for (i, (digest, unguarded)) in guarded_answer
        .trailer
        .samples
        .iter()
        .zip(&plain.trailer.samples)
        .enumerate()
    {
        let near = digest.nearest_zoo.expect("nearness of every sample");
        let first_draw = unguarded.nearest_zoo.unwrap();
        assert!(
            (-1.0..=1.0001).contains(&near.cosine) && near.l2 >= 0.0,
            "{near:?}"
        );
        assert_eq!(
            first_draw.too_close,
            first_draw.cosine > spread.too_close_cosine || first_draw.l2 < spread.too_close_l2
        );
        assert_eq!(first_draw.redraws, 0);
        if first_draw.too_close {
            assert!(near.redraws >= 1 && near.redraws <= 3, "{near:?}");
            assert!(!near.too_close || near.redraws == 3, "{near:?}");
        } else {
            assert_eq!(
                near.redraws, 0,
                "sample {i} was not too close: {first_draw:?}"
            );
            assert_eq!(guarded_answer.files[i], plain.files[i]);
        }
    }
    assert_ne!(ddpm.files, first.files);

    // A task file (as `weightgen task` writes it) through the Python client:
    // it builds its stubs at install time, gets the same bytes as the Rust
    // client, loads them strictly into nn.Sequential and fine-tunes.
    let dir = server.data_dir.path();
    let task_path = dir.join("task.json");
    let output = Command::new(CLI)
        .args(["task", "--family", "digits", "--classes", "0,1,2,3,4", "-o"])
        .arg(&task_path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", combined_output(&output));
    let task_file = TaskFile::read(&task_path).unwrap();
    let mut built_here = TaskFile::of_task(
        Family::Digits,
        ARCH,
        &TaskSpec::Digits {
            classes: vec![0, 1, 2, 3, 4],
        },
    )
    .unwrap();
    // Features are reductions: libtorch's intra-op thread count (process-wide,
    // changed by other tests in this binary) may change their last bits.
    assert_eq!(
        task_file.features.keys().collect::<Vec<_>>(),
        built_here.features.keys().collect::<Vec<_>>()
    );
    for (name, values) in &task_file.features {
        for (a, b) in values.iter().zip(&built_here.features[name]) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name}: {a} vs {b}"
            );
        }
    }
    built_here.features = task_file.features.clone();
    assert_eq!(task_file, built_here);
    let mut from_file = request(&task_file.to_proto(), Sampler::Ddim, 1, 42);
    from_file.options.as_mut().unwrap().guidance_scale = Some(2.0);
    let rust_bytes = generate_with(&mut client, from_file).await.unwrap().files[0].clone();

    // The same task without its features: conditioned on the support set
    // alone (deterministic, the architecture's layout, not the answer the
    // features give).
    let mut support_only = task_file.to_proto();
    assert!(support_only.support.is_some());
    support_only.features.clear();
    let alone = generate_with(&mut client, request(&support_only, Sampler::Ddim, 1, 42))
        .await
        .unwrap();
    let alone_again = generate_with(&mut client, request(&support_only, Sampler::Ddim, 1, 42))
        .await
        .unwrap();
    assert_eq!(alone.files, alone_again.files);
    assert_eq!(layout(&alone.files[0]), expected("F32"));
    let with_features = generate_with(
        &mut client,
        request(&task_file.to_proto(), Sampler::Ddim, 1, 42),
    )
    .await
    .unwrap();
    assert_ne!(alone.files, with_features.files);

    let site = dir.join("python-site");
    install_python_client(&site);
    let saved = dir.join("python.safetensors");
    let out = run_python(
        &site,
        &[
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/clients/python/examples/finetune.py"
            ),
            "--addr",
            &server.addr(),
            "--task",
            task_path.to_str().unwrap(),
            "--seed",
            "42",
            "--guidance",
            "2",
            "--steps",
            "100",
            "--lr",
            "1e-2",
            "--save",
            saved.to_str().unwrap(),
        ],
    );
    eprintln!("{out}");
    assert_eq!(std::fs::read(&saved).unwrap(), rust_bytes);
    crate::common::transformers_reads(&saved);
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap()).expect("a JSON summary");
    let tensors: HashMap<String, (Vec<usize>, String)> =
        serde_json::from_value(summary["tensors"].clone()).unwrap();
    for (name, shape, _) in expected("F32") {
        assert_eq!(tensors[&name], (shape, "float32".to_owned()), "{name}");
    }
    // Fine-tuning from the generated init learns the task.
    let final_generated = summary["final"]["generated"].as_f64().unwrap();
    assert!(final_generated > 0.8, "{out}");

    // `weightgen_client.torch`: from the user's own module. warm_start finds
    // the architecture by the module's tensors, loads the same sample as the
    // request above (same seed and guidance) strictly in place, in the
    // module's dtype; a module that matches nothing is refused naming the
    // tensors that differ; architecture_of describes a module as the server
    // does; a CNN is matched to the CNN architecture.
    let script = r#"
import sys, torch
from torch import nn
from safetensors.torch import load_file
from weightgen_client import WeightgenClient, load_task
from weightgen_client.torch import ArchitectureMismatch, architecture_of, find_architecture, warm_start

client, task = WeightgenClient(sys.argv[1]), load_task(sys.argv[2])
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).double()
answer = warm_start(model, task, client, seed=42, guidance=2)
expected = load_file(sys.argv[3])
assert all(torch.equal(v, expected[k].double()) for k, v in model.state_dict().items())
assert all(v.dtype == torch.float64 for v in model.state_dict().values())
print("warm-started:", answer.header.architecture.name)
try:
    architecture_of(model)
    raise SystemExit("a float64 module was described with a dtype the server has no name for")
except ValueError as e:
    print("float64:", e)
spec = architecture_of(model.float(), name=answer.header.architecture.name, family="digits")
served = answer.header.architecture
assert [(t.name, list(t.shape)) for t in spec.tensors] == [(t.name, list(t.shape)) for t in served.tensors]
assert [(g.name, g.kind, list(g.tensors)) for g in spec.layers] == [(g.name, g.kind, list(g.tensors)) for g in served.layers], (spec.layers, served.layers)
assert spec.num_parameters == served.num_parameters
try:
    warm_start(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5)), task, client)
    raise SystemExit("a module of another shape was warm-started")
except ArchitectureMismatch as e:
    print("mismatch:", e)
try:
    warm_start(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5), nn.ReLU(), nn.Linear(5, 5)),
               task, client, architecture="digits-mlp-64-32-5")
    raise SystemExit("a module with parameters the init does not cover was warm-started")
except ArchitectureMismatch as e:
    print("named architecture:", e)
cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5))
print("cnn:", find_architecture(client, cnn))
answer = warm_start(cnn, task, client, seed=5)
generated = answer.state_dicts()[0]
assert all(torch.equal(v, generated[k]) for k, v in cnn.state_dict().items())
logits = cnn(torch.rand(3, 1, 8, 8))
assert logits.shape == (3, 5) and torch.isfinite(logits).all()
print("cnn warm-started:", answer.header.architecture.name)
"#;
    // The CNN's architecture reaches the catalog with a zoo of its own, and
    // a denoiser of that zoo serves it.
    let cnn = "digits-cnn-8-16-5";
    crate::common::generation::worker(
        &data,
        &[
            "zoo",
            "build",
            "--family",
            "digits",
            "--zoo",
            "digits-cnn",
            "--architecture",
            cnn,
            "--models",
            "12",
            "--steps",
            "20",
        ],
    );
    crate::common::generation::worker(
        &data,
        &[
            "train",
            "--zoo",
            "digits-cnn",
            "--denoiser-id",
            "digits-cnn-e2e",
            "--steps",
            "40",
            "--widths",
            "64,32",
            "--latent",
            "none",
            "--eval-tasks",
            "1",
            "--device",
            "cpu",
            "--activate",
        ],
    );
    let mut ready = false;
    for _ in 0..300 {
        let answer = client
            .denoiser_ready(pb::DenoiserReadyRequest {
                architecture: cnn.into(),
                denoiser_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if answer.ready {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "the CNN denoiser was not loaded within 30 s");
    let out = run_python(
        &site,
        &[
            "-c",
            script,
            &server.addr(),
            task_path.to_str().unwrap(),
            saved.to_str().unwrap(),
        ],
    );
    eprintln!("{out}");
    assert!(
        out.contains("warm-started: digits-mlp-64-32-5")
            && out.contains("float64: 0.weight: dtype torch.float64 is not one of"),
        "{out}"
    );
    assert!(
        out.contains("mismatch: no architecture matches the module; closest is digits-mlp-64-32-5")
            && out.contains("0.weight [48, 64] vs [32, 64]"),
        "{out}"
    );
    assert!(out.contains("cnn: digits-cnn-"), "{out}");
    assert!(out.contains("cnn warm-started: digits-cnn-8-16-5"), "{out}");
    assert!(
        out.contains("named architecture: digits-mlp-64-32-5, the architecture asked for, does not fit the module (not in digits-mlp-64-32-5: 4.weight, 4.bias)"),
        "{out}"
    );

    // The Python client raises the server's status, naming the field.
    let script = r#"
import sys, grpc
from weightgen_client import WeightgenClient, WeightgenError, load_task
task = load_task(sys.argv[2])
task["features"]["input_mean"] = [99.0]
try:
    WeightgenClient(sys.argv[1]).generate_init(task, dtype="bf16")
except WeightgenError as e:
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT, e
    print("refused:", e.details)
task = load_task(sys.argv[2])
parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
answer = WeightgenClient(sys.argv[1]).generate_init(
    task, num_samples=2, dtype="bf16", seed=7, traceparent=parent)
print("dtypes:", sorted({str(t.dtype) for sd in answer.state_dicts() for t in sd.values()}))
try:
    WeightgenClient(sys.argv[1], traceparent="00-not-a-trace-01")
except ValueError as e:
    print("traceparent refused:", e)
"#;
    let out = run_python(
        &site,
        &["-c", script, &server.addr(), task_path.to_str().unwrap()],
    );
    assert!(
        out.contains("refused: task.features.input_mean: value 0 is 99"),
        "{out}"
    );
    assert!(out.contains("dtypes: ['torch.bfloat16']"), "{out}");
    assert!(
        out.contains("traceparent refused: traceparent '00-not-a-trace-01': expected 00-<32 hex"),
        "{out}"
    );

    // The Python client sends its bearer token (token=, or WEIGHTGEN_TOKEN)
    // to a server started with --auth-tokens on the same catalog, over
    // mutual TLS (certificates made here): the CLI and the Python client
    // verify the server against the CA and present a client certificate.
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "py generate sha256:{}\nviewer read sha256:{}\nmetered generate sha256:{} samples=3/min\n",
            weightgen::blobs::sha256_hex(b"py-token"),
            weightgen::blobs::sha256_hex(b"view-token"),
            weightgen::blobs::sha256_hex(b"metered-token")
        ),
    )
    .unwrap();
    let pki = crate::common::tls::Pki::new(dir, "interop");
    let server_leaf = pki.leaf(
        "server",
        &["localhost", "127.0.0.1"],
        crate::common::tls::Usage::Server,
        false,
    );
    let client_leaf = pki.leaf("client", &["py"], crate::common::tls::Usage::Client, false);
    let guarded = spawn_server(|c| {
        c.storage = weightgen::storage::StorageArgs::embedded(&data);
        c.auth_tokens = Some(tokens.clone());
        c.tls.cert = Some(server_leaf.cert.clone());
        c.tls.key = Some(server_leaf.key.clone());
        c.tls.client_ca = Some(pki.ca_pem());
    })
    .await;
    let script = r#"
import sys, grpc
from weightgen_client import WeightgenClient, WeightgenError, load_task
task = load_task(sys.argv[2])
tls = dict(tls_ca=sys.argv[3], tls_cert=sys.argv[4], tls_key=sys.argv[5])
for token, expected in [(None, grpc.StatusCode.UNAUTHENTICATED), ("view-token", grpc.StatusCode.PERMISSION_DENIED)]:
    try:
        WeightgenClient(sys.argv[1], token=token, **tls).generate_init(task)
        raise SystemExit(f"token {token!r} was let through")
    except WeightgenError as e:
        assert e.code == expected, e
try:
    WeightgenClient(sys.argv[1], token="py-token", timeout=10, tls_ca=sys.argv[3]).generate_init(task)
    raise SystemExit("a client without a certificate was let through")
except WeightgenError as e:
    print("no client certificate:", e.code.name)
print("files:", len(WeightgenClient(sys.argv[1], token="py-token", **tls).generate_init(task).files))
metered = WeightgenClient(sys.argv[1], token="metered-token", **tls)
print("metered:", len(metered.generate_init(task, num_samples=2).files))
try:
    metered.generate_init(task, num_samples=2)
    raise SystemExit("a call over the sample quota was let through")
except WeightgenError as e:
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED, e
    print("over quota:", e.details)
"#;
    let mut wait = std::process::Command::new(CLI);
    wait.args(["--addr", &guarded.addr(), "health", "--service"])
        .args(["weightgen.v1.GenerationService", "--wait", "60s"])
        .arg("--tls-ca")
        .arg(pki.ca_pem())
        .arg("--tls-client-cert")
        .arg(&client_leaf.cert)
        .arg("--tls-client-key")
        .arg(&client_leaf.key);
    let output = wait.output().unwrap();
    assert!(output.status.success(), "{}", combined_output(&output));
    // Plaintext towards a TLS port fails clearly instead of hanging.
    let output = std::process::Command::new(CLI)
        .args(["--addr", &guarded.addr(), "--timeout", "5s", "server-info"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "{}", combined_output(&output));
    let out = run_python(
        &site,
        &[
            "-c",
            script,
            &guarded.addr(),
            task_path.to_str().unwrap(),
            pki.ca_pem().to_str().unwrap(),
            client_leaf.cert.to_str().unwrap(),
            client_leaf.key.to_str().unwrap(),
        ],
    );
    assert!(out.contains("files: 1"), "{out}");
    assert!(out.contains("no client certificate: UNAVAILABLE"), "{out}");
    assert!(out.contains("metered: 2"), "{out}");
    assert!(
        out.contains("over its quota of 3 samples per minute (2 used)"),
        "{out}"
    );
    guarded.server.shutdown().await.unwrap();

    // upload_zoo: a user's own trained modules join the zoo; a file the
    // catalog holds is not sent again (also on a second run), one refused
    // item does not stop the rest, progress after every item. The asyncio
    // client draws the same bytes as the blocking one.
    let script = r#"
import asyncio, sys, grpc, torch
from torch import nn
from weightgen_client import WeightgenClient, ZooItem, load_task
from weightgen_client.aio import AsyncWeightgenClient

addr, task = sys.argv[1], load_task(sys.argv[2])
client = WeightgenClient(addr)
def trained(seed, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 5))
items = [ZooItem(trained(s), task, family="digits", metrics={"test_accuracy": 0.9}, name=f"user-{s}") for s in (1, 2)]
items.append(ZooItem(trained(1).state_dict(), task, family="digits", name="user-1-again"))
items.append(ZooItem(trained(4, hidden=48), task, family="digits", name="wrong-shape"))
items.append({"checkpoint": "/nonexistent.safetensors", "task": task, "name": "missing-file"})
seen = []
report = client.upload_zoo(items, on_progress=seen.append)
print("first:", [(r.name, r.status) for r in report.results])
assert [p.done for p in seen] == [1, 2, 3, 4, 5] and seen[-1].total == 5, seen
wrong = report.results[3].error
assert wrong.code == grpc.StatusCode.INVALID_ARGUMENT, wrong
print("wrong shape:", wrong.details)
assert isinstance(report.results[4].error, OSError)
assert report.results[2].model_id == report.results[0].model_id
again = []
second = client.upload_zoo(items[:3], on_progress=again.append)
print("again:", [r.status for r in second.results], again[-1].bytes_sent)

async def main():
    async with AsyncWeightgenClient(addr) as aclient:
        inits = await aclient.generate_init(task, num_samples=2, seed=11)
        uploaded = await aclient.upload_zoo([ZooItem(trained(3), task, family="digits")])
        return inits, uploaded
inits, uploaded = asyncio.run(main())
assert inits.files == client.generate_init(task, num_samples=2, seed=11).files
print("async:", len(inits.files), uploaded.results[0].status)
"#;
    let out = run_python(
        &site,
        &["-c", script, &server.addr(), task_path.to_str().unwrap()],
    );
    eprintln!("{out}");
    assert!(
        out.contains("first: [('user-1', 'uploaded'), ('user-2', 'uploaded'), ('user-1-again', 'already stored'), ('wrong-shape', 'failed'), ('missing-file', 'failed')]"),
        "{out}"
    );
    assert!(out.contains("wrong shape: file."), "{out}");
    assert!(
        out.contains("again: ['already stored', 'already stored', 'already stored'] 0"),
        "{out}"
    );
    assert!(out.contains("async: 2 uploaded"), "{out}");

    // `weightgen compare`: inits for held-out tasks over gRPC, fine-tuned
    // next to random inits, as a table.
    let output = Command::new(CLI)
        .args(["--addr", &server.addr(), "compare", "--held-out", "2"])
        .args([
            "--finetune-steps",
            "40",
            "--full-steps",
            "80",
            "--seed",
            "5",
        ])
        .output()
        .unwrap();
    let text = combined_output(&output);
    assert!(output.status.success(), "{text}");
    eprintln!("{text}");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("{\"family\":\"digits\""))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    for row in rows {
        let numbers: Vec<&str> = row.split_whitespace().skip(1).collect();
        let zero_shot: f64 = numbers[0].parse().unwrap();
        let full: f64 = numbers[4].parse().unwrap();
        assert!((0.0..=1.0).contains(&zero_shot), "{row}");
        assert!(full > 0.8, "random init trained 80 steps: {row}");
    }
    assert!(text.contains("median steps to target"), "{text}");
    server.server.shutdown().await.unwrap();
}
