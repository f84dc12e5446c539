//! `weightgen-worker`: background work — building model zoos, training
//! and publishing denoisers — and a device check.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use weightgen::device::{DeviceChoice, device_name};
use weightgen::model::{FitConfig, MlpUnetConfig, NetConfig};
use weightgen::storage::StorageArgs;
use weightgen::tasks::{Family, TrainConfig};
use weightgen::telemetry::{self, LogArgs};
use weightgen::torch_info::{TorchInfo, smoke_test};
use weightgen::train::{TrainDenoiserConfig, train_denoiser};
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
    /// Train a denoiser on a zoo, score it zero-shot and publish it.
    Train(Box<TrainArgs>),
}

#[derive(Args)]
struct TrainArgs {
    /// The zoo to train on.
    #[arg(long, env = "WEIGHTGEN_TRAIN_ZOO")]
    zoo: String,
    /// Id of the new denoiser version (default: ZOO-UNIX_SECONDS).
    #[arg(long, env = "WEIGHTGEN_TRAIN_DENOISER_ID")]
    denoiser_id: Option<String>,
    /// Optimizer steps (the proposal: 200,000).
    #[arg(long, env = "WEIGHTGEN_TRAIN_STEPS", default_value_t = 200_000)]
    steps: usize,
    /// Batch size (the proposal: 64).
    #[arg(long, env = "WEIGHTGEN_TRAIN_BATCH_SIZE", default_value_t = weightgen::model::fit::DEFAULT_BATCH_SIZE)]
    batch_size: i64,
    /// Adam learning rate (the proposal: 1e-4).
    #[arg(long, env = "WEIGHTGEN_TRAIN_LEARNING_RATE", default_value_t = weightgen::model::fit::DEFAULT_LEARNING_RATE)]
    learning_rate: f64,
    /// Share of rows trained unconditionally (classifier-free guidance).
    #[arg(long, env = "WEIGHTGEN_TRAIN_COND_DROPOUT", default_value_t = weightgen::model::fit::DEFAULT_COND_DROPOUT)]
    cond_dropout: f64,
    /// EMA decay of the published weights (0: last weights).
    #[arg(long, env = "WEIGHTGEN_TRAIN_EMA_DECAY", default_value_t = weightgen::train::DEFAULT_EMA_DECAY)]
    ema_decay: f64,
    /// Share of zoo models held out for validation.
    #[arg(long, env = "WEIGHTGEN_TRAIN_VAL_FRACTION", default_value_t = weightgen::train::DEFAULT_VAL_FRACTION)]
    val_fraction: f64,
    /// Widths of the MLP U-Net levels, widest first.
    #[arg(
        long,
        env = "WEIGHTGEN_TRAIN_WIDTHS",
        value_delimiter = ',',
        default_value = "512,256"
    )]
    widths: Vec<i64>,
    /// Held-out tasks the quality gate scores.
    #[arg(long, env = "WEIGHTGEN_TRAIN_EVAL_TASKS", default_value_t = 20)]
    eval_tasks: usize,
    /// Classifier-free guidance scale of the quality gate's samples.
    #[arg(long, env = "WEIGHTGEN_TRAIN_EVAL_GUIDANCE", default_value_t = 1.0)]
    eval_guidance: f64,
    /// Seed of batches, noise and the quality gate.
    #[arg(long, env = "WEIGHTGEN_TRAIN_SEED", default_value_t = 0)]
    seed: u64,
    /// Log and validate every this many steps.
    #[arg(long, env = "WEIGHTGEN_TRAIN_LOG_EVERY", default_value_t = 1000)]
    log_every: usize,
    /// Make it the active denoiser of its architecture once published.
    #[arg(long, env = "WEIGHTGEN_TRAIN_ACTIVATE")]
    activate: bool,
    /// Device to train on: auto, cpu or cuda:N.
    #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    #[command(flatten)]
    storage: StorageArgs,
}

fn train(args: TrainArgs) -> Result<String, String> {
    let device = args.device.resolve().map_err(|e| e.to_string())?;
    let denoiser_id = args.denoiser_id.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("{}-{now}", args.zoo)
    });
    let config = TrainDenoiserConfig {
        zoo: args.zoo,
        denoiser_id,
        net: NetConfig::MlpUnet(MlpUnetConfig {
            widths: args.widths,
            ..Default::default()
        }),
        fit: FitConfig {
            steps: args.steps,
            batch_size: args.batch_size,
            learning_rate: args.learning_rate,
            cond_dropout: args.cond_dropout,
            seed: args.seed,
            ..Default::default()
        },
        ema_decay: args.ema_decay,
        val_fraction: args.val_fraction,
        encoder_hidden: 128,
        embed_dim: 64,
        log_every: args.log_every,
        eval_tasks: args.eval_tasks,
        eval_guidance: args.eval_guidance,
        device,
        activate: args.activate,
    };
    let steps = config.fit.steps as u64;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let (catalog, blobs) = args.storage.open().await.map_err(|e| e.to_string())?;
        let bar = progress_bar(std::io::stderr().is_terminal());
        bar.set_length(steps);
        let shown = bar.clone();
        let outcome = train_denoiser(catalog, blobs, config, move |step, train, val| {
            shown.set_position(step as u64);
            shown.set_message(format!("loss {train:.4} val {val:.4}"));
        })
        .await
        .map_err(|e| e.to_string())?;
        bar.finish_and_clear();
        let q = &outcome.quality;
        Ok(format!(
            "published denoiser {} ({}{}); {} zero-shot: zoo tasks DDIM {:.3} DDPM {:.3} nearest-zoo {:.3} chance {:.3}; held-out DDIM {:.3} DDPM {:.3} nearest-zoo {:.3} chance {:.3}",
            outcome.record.id,
            outcome.record.architecture,
            if outcome.record.active { ", active" } else { "" },
            q.metric,
            q.zoo_tasks.ddim,
            q.zoo_tasks.ddpm,
            q.zoo_tasks.nearest_zoo,
            q.zoo_tasks.chance,
            q.held_out.ddim,
            q.held_out.ddpm,
            q.held_out.nearest_zoo,
            q.held_out.chance
        ))
    })
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
        Some(Command::Train(args)) => match train(*args) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weightgen-worker: train: {e}");
                ExitCode::FAILURE
            }
        },
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
