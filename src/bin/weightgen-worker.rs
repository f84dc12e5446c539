//! `weightgen-worker`: background work — building model zoos, training
//! and publishing denoisers — and a device check.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use weightgen::cancel::CancelFlag;
use weightgen::device::{DeviceChoice, device_name};
use weightgen::jobs::{RunnerConfig, TrainJob, run_jobs};
use weightgen::storage::StorageArgs;
use weightgen::tasks::{Family, TrainConfig};
use weightgen::telemetry::{self, LogArgs, error_chain};
use weightgen::torch_info::{TorchInfo, smoke_test};
use weightgen::train::train_denoiser;
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
    /// Consumes zoo-building and training jobs from the catalog's queue.
    Run(Box<RunArgs>),
    /// Evaluate a published denoiser against baselines on held-out tasks
    /// (zero-shot, steps to target at two learning rates, few-shot,
    /// novelty) and write the report's Markdown section.
    Eval(Box<EvalArgs>),
    /// Remove what killed processes left in the blob store: partial writes
    /// and blobs no catalog row or training run refers to, once older than
    /// the grace period.
    Gc(Box<GcArgs>),
}

#[derive(Args)]
struct GcArgs {
    /// Only files and blobs older than this are removed (a writer between
    /// its blob and its catalog row must never take longer). E.g. "1h".
    #[arg(long, env = "WEIGHTGEN_GC_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
    /// List what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    storage: StorageArgs,
}

fn gc(args: GcArgs) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (catalog, blobs) = args.storage.open().await?;
        let config = weightgen::gc::GcConfig {
            grace: args.grace,
            dry_run: args.dry_run,
            upload_staging: Some(args.storage.upload_staging()),
        };
        let report = weightgen::gc::collect(catalog.as_ref(), &blobs, &config)
            .await?;
        let verb = if args.dry_run { "would remove" } else { "removed" };
        Ok(format!(
            "{verb} {} partial write(s) and {} unreferenced blob(s), {} bytes; kept {} live blob(s) and {} orphan(s) younger than {}",
            report.staging.len(),
            report.unreferenced.len(),
            report.bytes,
            report.live,
            report.young,
            humantime::format_duration(args.grace)
        ))
    })
}

#[derive(Args)]
struct EvalArgs {
    /// The zoo the denoiser learned (its architecture picks the denoiser).
    #[arg(long, env = "WEIGHTGEN_EVAL_ZOO")]
    zoo: String,
    /// Denoiser to evaluate (default: the active one of the zoo's architecture).
    #[arg(long, env = "WEIGHTGEN_EVAL_DENOISER_ID")]
    denoiser_id: Option<String>,
    /// The quick profile (minutes on 2 CPU cores; checks the harness, not the numbers).
    #[arg(long, env = "WEIGHTGEN_EVAL_QUICK")]
    quick: bool,
    /// Held-out tasks (default: 20, quick 3).
    #[arg(long)]
    tasks: Option<usize>,
    /// Seeds per task (default: 3, quick 1).
    #[arg(long)]
    seeds: Option<usize>,
    /// Fine-tuning budget in steps (default: 500, quick 40).
    #[arg(long)]
    finetune_steps: Option<usize>,
    /// Steps that train random init fully (default: 2000, quick 80).
    #[arg(long)]
    full_steps: Option<usize>,
    /// Guidance scale of the guided rows.
    #[arg(long, default_value_t = 3.0)]
    guidance: f64,
    /// Seed of task draws, sampling and random inits.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out split: interpolation (new tasks inside the zoo's range, every
    /// family) or extrapolation (`sinusoid` only; its report goes to section
    /// `eval:FAMILY:ZOO:extrapolation`).
    #[arg(long, env = "WEIGHTGEN_EVAL_SPLIT", default_value = "interpolation")]
    split: weightgen::tasks::HeldOutSplit,
    /// Ablation mode: evaluate these denoisers (trained on the zoo with one
    /// design choice changed each) on the same tasks, random init and the
    /// guided DDIM row only, into one table (section `eval:FAMILY:ZOO:ablation`).
    #[arg(long, value_delimiter = ',', conflicts_with = "denoiser_id")]
    ablation: Vec<String>,
    /// Evaluate only these methods, comma-separated (e.g.
    /// `weightgen-features-only,nearest-zoo`; random init always runs, it is
    /// the yardstick): a report's rows in minutes instead of an hour. Default:
    /// every method.
    #[arg(
        long,
        env = "WEIGHTGEN_EVAL_METHODS",
        value_delimiter = ',',
        conflicts_with = "ablation"
    )]
    methods: Vec<weightgen::eval::Method>,
    /// Markdown file whose `eval:FAMILY:ZOO` section gets the report
    /// (replaced in place); the plots go to `eval/` beside it.
    #[arg(long, env = "WEIGHTGEN_EVAL_OUTPUT")]
    output: Option<std::path::PathBuf>,
    /// Device to sample on: auto, cpu or cuda:N (fine-tuning runs on the CPU).
    #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "cpu")]
    device: DeviceChoice,
    #[command(flatten)]
    storage: StorageArgs,
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// Who produced a report: the zoo, the command as given, commit, machine.
fn provenance(
    args: &EvalArgs,
    data: &weightgen::zoo::ZooDataset,
    device: tch::Device,
    started: std::time::Instant,
    denoiser: &str,
) -> weightgen::eval::Provenance {
    weightgen::eval::Provenance {
        title: format!(
            "`{}` (zoo `{}`, {} models, {}){}",
            data.family.name(),
            args.zoo,
            data.len(),
            data.network.spec.name,
            match args.split {
                weightgen::tasks::HeldOutSplit::Interpolation => String::new(),
                split => format!(", {} split", split.name()),
            }
        ),
        // The program by its name, the arguments as given.
        command: std::env::args()
            .enumerate()
            .map(|(i, a)| match i {
                0 => a.rsplit('/').next().unwrap_or_default().to_owned(),
                _ => a,
            })
            .collect::<Vec<_>>()
            .join(" "),
        commit: commit(),
        machine: format!(
            "{} CPU cores, sampling on {} ({:.0} s)",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            device_name(device),
            started.elapsed().as_secs_f64()
        ),
        denoiser: denoiser.to_owned(),
    }
}

/// `eval --ablation`: each listed denoiser through the harness (random init
/// and the guided DDIM row), one table. The zoo is loaded once and random
/// init's figures are measured once for all rows.
fn eval_ablation(
    args: &EvalArgs,
    mut config: weightgen::eval::EvalConfig,
    device: tch::Device,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<String> {
    config.only = Some(vec![weightgen::eval::ABLATION_METHOD]);
    let started = std::time::Instant::now();
    let (catalog, blobs) = runtime.block_on(args.storage.open())?;
    let data = runtime.block_on(weightgen::eval::load_zoo(&catalog, &blobs, &args.zoo))?;
    check_split(&data, &args.zoo, args.split)?;
    let mut yardstick = weightgen::eval::Yardstick::default();
    let mut rows = Vec::new();
    for id in &args.ablation {
        let (checkpoint, record) = runtime.block_on(weightgen::eval::load_denoiser(
            &catalog,
            &blobs,
            &data,
            Some(id),
            device,
        ))?;
        tracing::info!(denoiser = %id, "ablation: evaluating");
        let report = weightgen::eval::evaluate_with(&checkpoint, &data, &config, &mut yardstick)
            .with_context(|| id.clone())?;
        rows.push(weightgen::eval::AblationRow {
            denoiser: id.clone(),
            variant: weightgen::eval::Variant::of(
                checkpoint.model.config(),
                &record.config,
                record.summary.get("zoo_models").copied().unwrap_or(0.0),
            ),
            report,
        });
    }
    let who = provenance(args, &data, device, started, &args.ablation.join(", "));
    let text = weightgen::eval::ablation_markdown(&rows, &config, &who);
    if let Some(path) = &args.output {
        let key = format!("{}:ablation", section_key(args, &data));
        weightgen::eval::write_section(path, &key, &text)
            .with_context(|| path.display().to_string())?;
    }
    Ok(text)
}

/// The report's section: `FAMILY:ZOO`, with `:extrapolation` for that split.
fn section_key(args: &EvalArgs, data: &weightgen::zoo::ZooDataset) -> String {
    match args.split {
        weightgen::tasks::HeldOutSplit::Interpolation => {
            format!("{}:{}", data.family.name(), args.zoo)
        }
        split => format!("{}:{}:{}", data.family.name(), args.zoo, split.name()),
    }
}

/// Refuses a split the family does not have, and a zoo holding models of
/// held-out tasks: every method would be scored on tasks it was trained on.
fn check_split(
    data: &weightgen::zoo::ZooDataset,
    zoo: &str,
    split: weightgen::tasks::HeldOutSplit,
) -> anyhow::Result<()> {
    if !data.family.splits().contains(&split) {
        anyhow::bail!(
            "--split {}: family {} has no such split (only interpolation)",
            split.name(),
            data.family.name()
        );
    }
    match data.held_out_models().as_slice() {
        [] => Ok(()),
        leaked => Err(anyhow::anyhow!(
            "zoo {zoo}: {} model(s) (first: {}) were trained on held-out tasks \
             (a zoo built before the held-out split changed?); rebuild the zoo",
            leaked.len(),
            leaked[0]
        )),
    }
}

fn eval(args: EvalArgs) -> anyhow::Result<String> {
    let device = args.device.resolve()?;
    let mut config = if args.quick {
        weightgen::eval::EvalConfig::quick()
    } else {
        weightgen::eval::EvalConfig::full()
    };
    config.tasks = args.tasks.unwrap_or(config.tasks);
    config.seeds = args.seeds.unwrap_or(config.seeds);
    config.finetune_steps = args.finetune_steps.unwrap_or(config.finetune_steps);
    config.full_steps = args.full_steps.unwrap_or(config.full_steps);
    config.guidance = args.guidance;
    config.seed = args.seed;
    config.split = args.split;
    if !args.methods.is_empty() {
        config.only = Some(args.methods.clone());
    }
    if config.tasks == 0 || config.seeds == 0 || config.finetune_steps == 0 {
        anyhow::bail!("--tasks, --seeds and --finetune-steps must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    if !args.ablation.is_empty() {
        return eval_ablation(&args, config, device, &runtime);
    }
    let subject = runtime.block_on(async {
        let (catalog, blobs) = args.storage.open().await?;
        weightgen::eval::load_subject(
            &catalog,
            &blobs,
            &args.zoo,
            args.denoiser_id.as_deref(),
            device,
        )
        .await
        .map_err(anyhow::Error::from)
    })?;
    check_split(&subject.data, &args.zoo, args.split)?;
    let started = std::time::Instant::now();
    let report = weightgen::eval::evaluate(&subject.checkpoint, &subject.data, &config)?;
    let who = provenance(&args, &subject.data, device, started, &subject.record.id);
    let key = section_key(&args, &subject.data);
    let plots = match &args.output {
        Some(path) => {
            let dir = path
                .parent()
                .unwrap_or_else(|| std::path::Path::new("."))
                .join("eval");
            let stem = key.replace(':', "-");
            weightgen::eval::draw_plots(&report, &config, &dir, &stem)
                .map_err(anyhow::Error::msg)?
                .into_iter()
                .map(|(caption, file)| (caption, format!("eval/{file}")))
                .collect()
        }
        None => Vec::new(),
    };
    let text = weightgen::eval::markdown(&report, &config, &who, &plots);
    if let Some(path) = &args.output {
        weightgen::eval::write_section(path, &key, &text)
            .with_context(|| path.display().to_string())?;
    }
    Ok(text)
}

#[derive(Args)]
struct RunArgs {
    /// This worker's id (default: host name and process id).
    #[arg(long, env = "WEIGHTGEN_WORKER_ID")]
    worker_id: Option<String>,
    /// A job whose worker has not heartbeated for this long is taken over;
    /// heartbeats go out every third of it (default `jobs::DEFAULT_LEASE`).
    #[arg(long, env = "WEIGHTGEN_JOB_LEASE", default_value = "60s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Pause between claims while the queue is empty.
    #[arg(long, env = "WEIGHTGEN_JOB_POLL", default_value = "2s", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// Exit once no job is queued or running.
    #[arg(long, env = "WEIGHTGEN_JOB_EXIT_WHEN_IDLE")]
    exit_when_idle: bool,
    /// Exit after this many jobs.
    #[arg(long, env = "WEIGHTGEN_JOB_MAX_JOBS")]
    max_jobs: Option<usize>,
    /// Zoo models trained at once (default: the number of CPUs).
    #[arg(long, env = "WEIGHTGEN_ZOO_JOBS")]
    zoo_lanes: Option<usize>,
    #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    #[command(flatten)]
    storage: StorageArgs,
}

fn run(args: RunArgs) -> anyhow::Result<String> {
    let device = args.device.resolve()?;
    let config = RunnerConfig {
        worker: args
            .worker_id
            .unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id())),
        lease: args.lease,
        poll: args.poll,
        device,
        zoo_lanes: args
            .zoo_lanes
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        exit_when_idle: args.exit_when_idle,
        max_jobs: args.max_jobs,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (catalog, blobs) = args.storage.open().await?;
        tracing::info!(worker = %config.worker, lease = ?config.lease, "worker consuming jobs");
        let report = run_jobs(
            catalog,
            blobs,
            config,
            weightgen::serve::server::shutdown_signal(),
        )
        .await?;
        Ok(format!(
            "jobs: {} succeeded, {} failed, {} abandoned",
            report.succeeded, report.failed, report.abandoned
        ))
    })
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
    #[arg(long, env = "WEIGHTGEN_TRAIN_STEPS", default_value_t = weightgen::jobs::spec::DEFAULT_TRAIN_STEPS)]
    steps: usize,
    /// Batch size (the proposal: 64).
    #[arg(long, env = "WEIGHTGEN_TRAIN_BATCH_SIZE", default_value_t = weightgen::model::fit::DEFAULT_BATCH_SIZE)]
    batch_size: i64,
    /// Adam learning rate (the proposal: 1e-4).
    #[arg(long, env = "WEIGHTGEN_TRAIN_LEARNING_RATE", default_value_t = weightgen::model::fit::DEFAULT_LEARNING_RATE)]
    learning_rate: f64,
    /// Learning-rate schedule: constant (the proposal) or cosine (down to a
    /// tenth of --learning-rate at the last step).
    #[arg(long, env = "WEIGHTGEN_TRAIN_LR_SCHEDULE", default_value = weightgen::jobs::spec::DEFAULT_LR_SCHEDULE)]
    lr_schedule: String,
    /// Share of rows trained unconditionally (classifier-free guidance).
    #[arg(long, env = "WEIGHTGEN_TRAIN_COND_DROPOUT", default_value_t = weightgen::model::fit::DEFAULT_COND_DROPOUT)]
    cond_dropout: f64,
    /// Share of rows whose descriptor features are withheld (support set
    /// kept), so the denoiser can also be conditioned on a support set alone.
    #[arg(long, env = "WEIGHTGEN_TRAIN_FEATURE_DROPOUT", default_value_t = weightgen::jobs::spec::DEFAULT_FEATURE_DROPOUT)]
    feature_dropout: f64,
    /// Share of rows whose support set is withheld (features kept), so the
    /// denoiser can also be conditioned on the features alone.
    #[arg(long, env = "WEIGHTGEN_TRAIN_SUPPORT_DROPOUT", default_value_t = weightgen::jobs::spec::DEFAULT_SUPPORT_DROPOUT)]
    support_dropout: f64,
    /// Space of diffusion: none (the standardized weights), pca:K, or
    /// pca:auto (the smallest PCA latent whose rebuilt zoo models keep their
    /// test score).
    #[arg(long, env = "WEIGHTGEN_TRAIN_LATENT", default_value = weightgen::jobs::spec::DEFAULT_LATENT)]
    latent: String,
    /// Denoiser network: mlp_unet (the proposal) or layer_transformer.
    #[arg(long, env = "WEIGHTGEN_TRAIN_KIND", default_value = "mlp_unet")]
    kind: String,
    /// How the MLP U-Net takes in the condition: film (the proposal) or concat.
    #[arg(long, env = "WEIGHTGEN_TRAIN_CONDITIONING", default_value = "film")]
    conditioning: String,
    /// Diffusion steps T (the proposal: 1000).
    #[arg(long, env = "WEIGHTGEN_TRAIN_TIMESTEPS", default_value_t = weightgen::diffusion::schedule::DEFAULT_TIMESTEPS)]
    timesteps: usize,
    /// Noise schedule: cosine (the proposal) or linear.
    #[arg(long, env = "WEIGHTGEN_TRAIN_SCHEDULE", default_value = "cosine")]
    schedule: String,
    /// What the network predicts: epsilon (the proposal), x0 or v.
    #[arg(long, env = "WEIGHTGEN_TRAIN_PREDICTION", default_value = "epsilon")]
    prediction: String,
    /// Residual blocks per MLP U-Net level on each side.
    #[arg(long, env = "WEIGHTGEN_TRAIN_BLOCKS_PER_LEVEL", default_value_t = weightgen::model::mlp_unet::DEFAULT_BLOCKS_PER_LEVEL)]
    blocks_per_level: usize,
    /// Hidden width of the task encoder's paths (features, support pairs,
    /// label prototypes).
    #[arg(long, env = "WEIGHTGEN_TRAIN_ENCODER_HIDDEN", default_value_t = weightgen::jobs::spec::DEFAULT_ENCODER_HIDDEN)]
    encoder_hidden: i64,
    /// Size E of the task embedding.
    #[arg(long, env = "WEIGHTGEN_TRAIN_EMBED_DIM", default_value_t = weightgen::jobs::spec::DEFAULT_EMBED_DIM)]
    embed_dim: i64,
    /// Permutation alignment of the zoo: auto (unless built from one shared
    /// init), always or never.
    #[arg(long, env = "WEIGHTGEN_TRAIN_ALIGN", default_value = "auto")]
    align: String,
    /// Train on the first N zoo models only (by id).
    #[arg(long, env = "WEIGHTGEN_TRAIN_MAX_MODELS")]
    max_models: Option<usize>,
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
    #[arg(long, env = "WEIGHTGEN_TRAIN_EVAL_TASKS", default_value_t = weightgen::jobs::spec::DEFAULT_EVAL_TASKS)]
    eval_tasks: usize,
    /// Classifier-free guidance scale of the quality gate's samples.
    #[arg(long, env = "WEIGHTGEN_TRAIN_EVAL_GUIDANCE", default_value_t = weightgen::jobs::spec::DEFAULT_EVAL_GUIDANCE)]
    eval_guidance: f64,
    /// Seed of batches, noise and the quality gate.
    #[arg(long, env = "WEIGHTGEN_TRAIN_SEED", default_value_t = 0)]
    seed: u64,
    /// Log and validate every this many steps.
    #[arg(long, env = "WEIGHTGEN_TRAIN_LOG_EVERY", default_value_t = weightgen::jobs::spec::DEFAULT_LOG_EVERY)]
    log_every: usize,
    /// Make it the active denoiser of its architecture once published.
    #[arg(long, env = "WEIGHTGEN_TRAIN_ACTIVATE")]
    activate: bool,
    /// Save a resumable training checkpoint every this many steps (0 = never).
    #[arg(long, env = "WEIGHTGEN_TRAIN_CHECKPOINT_EVERY", default_value_t = weightgen::train::DEFAULT_CHECKPOINT_EVERY)]
    checkpoint_every: usize,
    /// Continue the run (same --denoiser-id) from its last checkpoint, if it has one.
    #[arg(long, env = "WEIGHTGEN_TRAIN_RESUME")]
    resume: bool,
    /// auto (fp16 autocast with loss scaling on CUDA, fp32 elsewhere), fp32 or fp16.
    #[arg(long, env = "WEIGHTGEN_TRAIN_PRECISION", default_value = "auto")]
    precision: String,
    /// Also write metrics.json and loss.png of the run into this directory.
    #[arg(long, env = "WEIGHTGEN_TRAIN_REPORT_DIR")]
    report_dir: Option<std::path::PathBuf>,
    /// Device to train on: auto, cpu or cuda:N.
    #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// libtorch's intra-op CPU threads (0: libtorch's default, one per
    /// core). Small denoisers train faster on one thread: thread hand-offs
    /// cost more than their matrices (BENCHMARKS.md).
    #[arg(long, env = "WEIGHTGEN_TRAIN_THREADS", default_value_t = 0)]
    threads: usize,
    /// Split each batch into this many parts, each computed on a thread of
    /// its own (CPU, with --threads 1); pays at larger batches, not at the
    /// demo's (BENCHMARKS.md). 1 splits nothing.
    #[arg(long, env = "WEIGHTGEN_TRAIN_DATA_PARALLEL", default_value_t = 1)]
    data_parallel: usize,
    #[command(flatten)]
    storage: StorageArgs,
}

fn train(args: TrainArgs) -> anyhow::Result<String> {
    let device = args.device.resolve()?;
    if args.threads > 0 {
        tch::set_num_threads(i32::try_from(args.threads).unwrap_or(i32::MAX));
    }
    if args.resume && args.denoiser_id.is_none() {
        anyhow::bail!("--resume needs the --denoiser-id of the run to continue");
    }
    let denoiser_id = args.denoiser_id.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("{}-{now}", args.zoo)
    });
    let job = TrainJob {
        zoo: args.zoo,
        denoiser_id: None,
        steps: args.steps,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        lr_schedule: args.lr_schedule,
        cond_dropout: args.cond_dropout,
        feature_dropout: args.feature_dropout,
        support_dropout: args.support_dropout,
        latent: args.latent,
        kind: args.kind,
        conditioning: args.conditioning,
        timesteps: args.timesteps,
        schedule: args.schedule,
        prediction: args.prediction,
        blocks_per_level: args.blocks_per_level,
        embed_dim: args.embed_dim,
        encoder_hidden: args.encoder_hidden,
        align: args.align,
        max_models: args.max_models,
        ema_decay: args.ema_decay,
        val_fraction: args.val_fraction,
        widths: args.widths,
        seed: args.seed,
        eval_tasks: args.eval_tasks,
        eval_guidance: args.eval_guidance,
        log_every: args.log_every,
        checkpoint_every: args.checkpoint_every,
        precision: args.precision,
        data_parallel: args.data_parallel,
        activate: args.activate,
    };
    let config = job.to_config(&denoiser_id, device, args.resume, CancelFlag::new())?;
    let report_dir = args.report_dir;
    let steps = config.fit.steps as u64;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (catalog, blobs) = args.storage.open().await?;
        let bar = progress_bar(
            std::io::stderr().is_terminal(),
            "[{bar:40}] {pos}/{len} it, {per_sec}, eta {eta} {msg}",
        );
        bar.set_length(steps);
        let shown = bar.clone();
        let blobs_for_report = blobs.clone();
        let outcome = train_denoiser(catalog, blobs, config, move |step, train, val| {
            shown.set_position(step as u64);
            shown.set_message(format!("loss {train:.4} val {val:.4}"));
        })
        .await?;
        bar.finish_and_clear();
        if let Some(dir) = &report_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--report-dir {}", dir.display()))?;
            for name in &outcome.artifacts {
                let bytes = blobs_for_report.get_named(name).await?.unwrap_or_default();
                let file = dir.join(name.rsplit('/').next().unwrap_or(name));
                std::fs::write(&file, bytes).with_context(|| file.display().to_string())?;
            }
        }
        let q = &outcome.quality;
        let resumed = outcome
            .resumed_from
            .map_or(String::new(), |step| format!(" (resumed at step {step})"));
        Ok(format!(
            "published denoiser {}{resumed} ({}{}); {} zero-shot: zoo tasks {}; held-out {}",
            outcome.record.id,
            outcome.record.architecture,
            if outcome.record.active {
                ", active"
            } else {
                ""
            },
            q.metric,
            q.zoo_tasks,
            q.held_out,
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

fn progress_bar(show: bool, template: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn zoo_build(args: BuildArgs) -> anyhow::Result<String> {
    let family = Family::parse(&args.family)?;
    let device = args.device.resolve()?;
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
        cancel: Default::default(),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (catalog, blobs) = args.storage.open().await?;
        let bar = progress_bar(
            std::io::stderr().is_terminal(),
            "{msg} [{bar:40}] {pos}/{len} models, {per_sec}, eta {eta}",
        );
        bar.set_message(config.zoo.clone());
        let shown = bar.clone();
        let report = build_zoo(catalog, blobs, config, move |r| {
            shown.set_length(r.total);
            shown.set_position(r.done);
        })
        .await?;
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

/// Prints a command's summary, or its error with its causes, and says how
/// it ended.
fn report(command: &str, result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weightgen-worker: {command}: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
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
        Some(Command::Run(args)) => report("run", run(*args)),
        Some(Command::Gc(args)) => report("gc", gc(*args)),
        Some(Command::Eval(args)) => report("eval", eval(*args)),
        Some(Command::Train(args)) => report("train", train(*args)),
        Some(Command::Zoo(ZooCommand::Build(args))) => report("zoo build", zoo_build(*args)),
    }
}
