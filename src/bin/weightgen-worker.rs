//! `weightgen-worker`: background work — building model zoos (denoiser
//! training arrives with its issue) — and a device check.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use weightgen::device::{DeviceChoice, device_name};
use weightgen::storage::StorageArgs;
use weightgen::tasks::{Family, TrainConfig};
use weightgen::telemetry::{self, LogArgs};
use weightgen::torch_info::{TorchInfo, smoke_test};
use weightgen::zoo::{ZooBuildConfig, build_zoo};

/// Builds model zoos and trains denoisers.
#[derive(Parser)]
#[command(name = "weightgen-worker", disable_version_flag = true)]
struct Cli {
    /// Print the versions of weightgen and libtorch and whether CUDA is
    /// available, then exit.
    #[arg(short = 'V', long)]
    version: bool,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a small matrix product on the device and check the result.
    CheckDevice {
        /// Device to check: auto, cpu or cuda:N.
        #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "auto")]
        device: DeviceChoice,
    },
    /// Model zoos.
    #[command(subcommand)]
    Zoo(ZooCommand),
}

#[derive(Subcommand)]
enum ZooCommand {
    /// Build (or continue building) a zoo from a task family. Re-running
    /// continues where a previous run stopped; several workers may build one
    /// zoo together against a PostgreSQL catalog.
    Build(Box<BuildArgs>),
}

#[derive(Args)]
struct BuildArgs {
    /// Task family: sinusoid, digits or digit-inr.
    #[arg(long, env = "WEIGHTGEN_ZOO_FAMILY")]
    family: String,
    /// Number of models in the zoo.
    #[arg(long, env = "WEIGHTGEN_ZOO_MODELS")]
    models: u64,
    /// Zoo name (default: the family's name).
    #[arg(long, env = "WEIGHTGEN_ZOO_NAME")]
    zoo: Option<String>,
    /// Architecture (default: the family's first).
    #[arg(long, env = "WEIGHTGEN_ZOO_ARCHITECTURE", default_value = "")]
    architecture: String,
    /// Seed of tasks, initializations and training order.
    #[arg(long, env = "WEIGHTGEN_ZOO_SEED", default_value_t = 0)]
    seed: u64,
    /// Start every model from one shared initialization (default: one
    /// initialization per model).
    #[arg(long, env = "WEIGHTGEN_ZOO_SHARED_INIT")]
    shared_init: bool,
    /// Optimizer steps per model (default: the family's).
    #[arg(long, env = "WEIGHTGEN_ZOO_STEPS")]
    steps: Option<usize>,
    /// Adam learning rate (default: the family's).
    #[arg(long, env = "WEIGHTGEN_ZOO_LEARNING_RATE")]
    learning_rate: Option<f64>,
    /// Keep this many checkpoints of each run, the last one being the end
    /// (0: the final model only).
    #[arg(long, env = "WEIGHTGEN_ZOO_KEEP_SNAPSHOTS", default_value_t = 0)]
    keep_snapshots: usize,
    /// Models trained at once (each on one thread). Default: the CPU count.
    #[arg(long, env = "WEIGHTGEN_ZOO_JOBS")]
    jobs: Option<usize>,
    /// This worker's id; must differ between concurrent workers (default:
    /// host name and process id).
    #[arg(long, env = "WEIGHTGEN_WORKER_ID")]
    worker_id: Option<String>,
    /// A claim older than this is presumed dead and retaken (e.g. "10m").
    #[arg(long, env = "WEIGHTGEN_ZOO_LEASE", default_value = "10m", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Stop after building this many models (default: until the zoo is complete).
    #[arg(long, env = "WEIGHTGEN_ZOO_MAX_MODELS")]
    max_models: Option<u64>,
    /// Device to train on: auto, cpu or cuda:N.
    #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "cpu")]
    device: DeviceChoice,
    #[command(flatten)]
    storage: StorageArgs,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

fn progress_bar(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} models, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn zoo_build(args: BuildArgs) -> Result<String, String> {
    let family = Family::parse(&args.family).map_err(|e| e.to_string())?;
    let device = args.device.resolve().map_err(|e| e.to_string())?;
    let defaults = family.train_config();
    let train = TrainConfig {
        steps: args.steps.unwrap_or(defaults.steps),
        learning_rate: args.learning_rate.unwrap_or(defaults.learning_rate),
        batch_size: defaults.batch_size,
        keep_snapshots: args.keep_snapshots,
    };
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Zoo models are tiny: one intra-op thread per model, `jobs` models at once.
    tch::set_num_threads(1);
    let config = ZooBuildConfig {
        zoo: args.zoo.unwrap_or_else(|| family.name().to_owned()),
        family,
        architecture: args.architecture,
        num_models: args.models,
        seed: args.seed,
        shared_init: args.shared_init,
        train,
        worker: args
            .worker_id
            .unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id())),
        jobs,
        lease: args.lease,
        device,
        max_models: args.max_models,
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let (catalog, blobs) = args.storage.open().await.map_err(|e| e.to_string())?;
        let bar = progress_bar(std::io::stderr().is_terminal());
        bar.set_message(config.zoo.clone());
        let shown = bar.clone();
        let report = build_zoo(catalog, blobs, config, move |r| {
            shown.set_length(r.total);
            shown.set_position(r.done);
        })
        .await
        .map_err(|e| e.to_string())?;
        bar.finish_and_clear();
        Ok(format!(
            "built {} models in {:.1} s ({:.1} models/min); zoo has {}/{} models",
            report.built,
            report.seconds,
            report.rate_per_minute(),
            report.done,
            report.total
        ))
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.version {
        print!("{}", TorchInfo::detect().report("weightgen-worker"));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("weightgen-worker: {e:#}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        None => {
            eprintln!("weightgen-worker: no command given; see --help");
            ExitCode::from(2)
        }
        Some(Command::CheckDevice { device }) => {
            let result = device
                .resolve()
                .map_err(|e| e.to_string())
                .and_then(|d| smoke_test(d).map(|value| (d, value)));
            match result {
                Ok((d, value)) => {
                    println!("device {} ok (matmul check = {value})", device_name(d));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weightgen-worker: device check failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Zoo(ZooCommand::Build(args))) => match zoo_build(*args) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weightgen-worker: zoo build: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
