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
use weightgen::eval::EvalSampler;
use weightgen::jobs::{RunnerConfig, TrainSpec, ZooSpec, run_jobs};
use weightgen::storage::StorageArgs;
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
    /// Publish a denoiser of several architectures (`train --also-zoo`)
    /// for one more that fits it but that it was not trained on — an
    /// unseen width: a catalog row ID.ARCH on the same checkpoint, which
    /// the server then serves for that architecture.
    AddArchitecture(Box<AddArchitectureArgs>),
    /// Remove what killed processes left in the blob store: partial writes
    /// and blobs no catalog row or training run refers to, once older than
    /// the grace period.
    Gc(Box<GcArgs>),
}

#[derive(Args)]
struct AddArchitectureArgs {
    /// The published denoiser (any of its rows: ID or ID.ARCH).
    #[arg(long, env = "WEIGHTGEN_ADD_ARCH_DENOISER_ID")]
    denoiser_id: String,
    /// The architecture to serve from it: registered, or a built-in
    /// family's (e.g. digits-mlp-64-48-5).
    #[arg(long, env = "WEIGHTGEN_ADD_ARCH_ARCHITECTURE")]
    architecture: String,
    /// Make the new row the architecture's active denoiser.
    #[arg(long, env = "WEIGHTGEN_ADD_ARCH_ACTIVATE")]
    activate: bool,
    #[command(flatten)]
    storage: StorageArgs,
}

fn add_architecture(args: AddArchitectureArgs) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (catalog, blobs) = args.storage.open().await?;
        let row = weightgen::train::publish_for_architecture(
            catalog,
            &blobs,
            &args.denoiser_id,
            &args.architecture,
            args.activate,
        )
        .await?;
        Ok(format!(
            "published denoiser {} ({}{}) on the checkpoint of {}; no gate scored this architecture",
            row.id,
            row.architecture,
            if row.active { ", active" } else { "" },
            args.denoiser_id
        ))
    })
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
    /// Sampler of weightgen's rows other than DDPM: ddim-50, ddim-10 (the
    /// serving default's step count), or one-step (one DPM-Solver++ step
    /// from t = T, the x̂₀ of pure noise; for v-prediction denoisers, with
    /// --guidance 1).
    #[arg(long, value_enum, env = "WEIGHTGEN_EVAL_SAMPLER", default_value_t = EvalSampler::Ddim50)]
    sampler: EvalSampler,
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
    /// every method. With `--ablation`: the other request forms to add as
    /// zero-shot columns (weightgen-features-only, weightgen-support-only,
    /// weightgen-wrong-task); default none.
    #[arg(long, env = "WEIGHTGEN_EVAL_METHODS", value_delimiter = ',')]
    methods: Vec<weightgen::eval::Method>,
    /// Markdown file whose `eval:FAMILY:ZOO` section gets the report
    /// (replaced in place); the plots go to `eval/` beside it.
    #[arg(long, env = "WEIGHTGEN_EVAL_OUTPUT")]
    output: Option<std::path::PathBuf>,
    /// Device to sample on: auto, cpu or cuda:N (fine-tuning runs on the CPU).
    #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "cpu")]
    device: DeviceChoice,
    /// libtorch's intra-op CPU threads (0: libtorch's default, one per
    /// core). Give 1 when other busy processes share the cores: on 2 cores
    /// beside one training thread a held-out run took 98 s with 2 OpenMP
    /// threads and 3.3 s with 1 (docs/RESULTS.md).
    #[arg(long, env = "WEIGHTGEN_EVAL_THREADS", default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    storage: StorageArgs,
}

/// The checkout's commit, and whether tracked files differ from it (a
/// report run from a dirty tree says so instead of naming a commit whose
/// code it did not run).
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        None => "unknown".into(),
        Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if changes.is_empty() => head,
            Some(_) => format!("{head} with uncommitted changes"),
            None => format!("{head} (tree state unknown)"),
        },
    }
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

/// A method's name on the command line (`--methods`).
fn method_name(method: weightgen::eval::Method) -> String {
    use clap::ValueEnum;
    method
        .to_possible_value()
        .map_or_else(|| format!("{method:?}"), |v| v.get_name().to_owned())
}

/// `eval --ablation`: each listed denoiser through the harness (random init
/// and the guided DDIM row), one table. The zoo is loaded once and random
/// init's figures are measured once for all rows.
fn eval_ablation(
    args: &EvalArgs,
    device: tch::Device,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<String> {
    let started = std::time::Instant::now();
    let only = weightgen::eval::ablation_methods(&args.methods).map_err(|method| {
        anyhow::anyhow!(
            "--methods with --ablation takes the other request forms only ({}), not {}",
            weightgen::eval::ABLATION_FORMS.map(method_name).join(", "),
            method_name(method)
        )
    })?;
    let (catalog, blobs) = runtime.block_on(args.storage.open())?;
    let data = runtime.block_on(weightgen::eval::load_zoo(&catalog, &blobs, &args.zoo))?;
    check_split(&data, &args.zoo, args.split)?;
    let config = weightgen::eval::EvalConfig {
        only: Some(only),
        ..eval_config(args, data.family)
    };
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

/// The harness's configuration for a zoo of `family`: the profile
/// (`--quick` or full, as that family runs it: its cost per fine-tuning
/// step differs) with the flags given on top.
fn eval_config(args: &EvalArgs, family: weightgen::tasks::Family) -> weightgen::eval::EvalConfig {
    let mut config = weightgen::eval::EvalConfig::profile(args.quick, family);
    config.tasks = args.tasks.unwrap_or(config.tasks);
    config.seeds = args.seeds.unwrap_or(config.seeds);
    config.finetune_steps = args.finetune_steps.unwrap_or(config.finetune_steps);
    config.full_steps = args.full_steps.unwrap_or(config.full_steps);
    config.guidance = args.guidance;
    config.sampler = args.sampler;
    config.seed = args.seed;
    config.split = args.split;
    if !args.methods.is_empty() {
        config.only = Some(args.methods.clone());
    }
    config
}

fn eval(args: EvalArgs) -> anyhow::Result<String> {
    let device = args.device.resolve()?;
    set_threads(args.threads);
    // Every profile has at least one of each: only the flags can be 0.
    if [args.tasks, args.seeds, args.finetune_steps].contains(&Some(0)) {
        anyhow::bail!("--tasks, --seeds and --finetune-steps must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    if !args.ablation.is_empty() {
        return eval_ablation(&args, device, &runtime);
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
    let config = eval_config(&args, subject.data.family);
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
    #[command(flatten)]
    spec: TrainSpec,
    /// Continue the run (same --denoiser-id) from its last checkpoint, if it has one.
    #[arg(long, env = "WEIGHTGEN_TRAIN_RESUME")]
    resume: bool,
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
    #[command(flatten)]
    storage: StorageArgs,
}

/// Sets libtorch's intra-op threads, unless `threads` is 0 (its default).
fn set_threads(threads: usize) {
    if threads > 0 {
        tch::set_num_threads(i32::try_from(threads).unwrap_or(i32::MAX));
    }
}

fn train(args: TrainArgs) -> anyhow::Result<String> {
    let device = args.device.resolve()?;
    set_threads(args.threads);
    if args.resume && args.spec.denoiser_id.is_none() {
        anyhow::bail!("--resume needs the --denoiser-id of the run to continue");
    }
    let denoiser_id = args.spec.denoiser_id.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("{}-{now}", args.spec.zoo)
    });
    let config = args
        .spec
        .to_config(&denoiser_id, device, args.resume, CancelFlag::new())?;
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
        let mut published = format!(
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
        );
        for (architecture, id, q) in &outcome.further {
            published.push_str(&format!(
                "\nand as {id} ({architecture}); zoo tasks {}; held-out {}",
                q.zoo_tasks, q.held_out
            ));
        }
        Ok(published)
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
    #[command(flatten)]
    spec: ZooSpec,
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
    let device = args.device.resolve()?;
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Zoo models are tiny: one intra-op thread per model, `jobs` models at once.
    tch::set_num_threads(1);
    let worker = args
        .worker_id
        .unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()));
    let config = ZooBuildConfig {
        max_models: args.max_models,
        ..args
            .spec
            .to_config(&worker, jobs, args.lease, device, Default::default())?
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
    // Held to the end of main: dropping it exports the last spans.
    let _telemetry = match telemetry::init(&cli.log, "weightgen-worker") {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("weightgen-worker: {e:#}");
            return ExitCode::FAILURE;
        }
    };
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
        Some(Command::AddArchitecture(args)) => report("add-architecture", add_architecture(*args)),
        Some(Command::Eval(args)) => report("eval", eval(*args)),
        Some(Command::Train(args)) => report("train", train(*args)),
        Some(Command::Zoo(ZooCommand::Build(args))) => report("zoo build", zoo_build(*args)),
    }
}
