//! `weightgen jobs …`: submit, list, inspect, cancel and wait for the
//! zoo-building and training jobs of the server's JobService.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::Code;
use weightgen::jobs::{TrainSpec, ZooSpec};
use weightgen::proto::v1 as pb;
use weightgen::serve::convert::jobs::{
    train_spec_from_proto, train_spec_to_proto, zoo_spec_from_proto, zoo_spec_to_proto,
};

use crate::output::{
    Failure, GetArgs, ListOptions, collect_pages, exit_code, number_text, on_terminal, out,
    print_fields, print_json, print_table, short_name, spinner, time_json, time_text,
};
use pb::job_service_client::JobServiceClient;

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Queue a job that trains zoo models for a built-in task family
    /// (run by `weightgen-worker run`).
    SubmitZoo(Box<SubmitZooArgs>),
    /// Queue a job that trains a denoiser on a zoo and publishes it
    /// (run by `weightgen-worker run`).
    SubmitTrain(Box<SubmitTrainArgs>),
    /// List jobs, newest first, following every page up to --limit.
    List {
        /// Only jobs in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only jobs of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        #[command(flatten)]
        options: ListOptions,
    },
    /// Describe one job: state, progress, attempts, spec, result or error.
    Get(GetArgs),
    /// Cancel a queued or running job (a finished job is left as it is).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Poll a job until it finishes, showing its state and progress; exit 0
    /// when it succeeded, 1 when it failed, was cancelled, or --max-wait ran
    /// out.
    Wait {
        /// Job id.
        id: String,
        /// Time between polls, e.g. "2s".
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        poll: Duration,
        /// Give up after this long, e.g. "30m" (default: wait as long as it takes).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_wait: Option<Duration>,
    },
}

/// A job state, for --state.
#[derive(Clone, Copy, ValueEnum)]
pub enum StateArg {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for pb::JobState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Queued => Self::Queued,
            StateArg::Running => Self::Running,
            StateArg::Succeeded => Self::Succeeded,
            StateArg::Failed => Self::Failed,
            StateArg::Cancelled => Self::Cancelled,
        }
    }
}

/// A job kind, for --kind.
#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    BuildZoo,
    TrainDenoiser,
}

impl From<KindArg> for pb::JobKind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::BuildZoo => Self::BuildZoo,
            KindArg::TrainDenoiser => Self::TrainDenoiser,
        }
    }
}

/// Flags every submission takes.
#[derive(Args)]
pub struct SubmitOptions {
    /// Attempts before the job fails for good (default: the server's, 3).
    #[arg(long, default_value_t = 0)]
    max_attempts: u32,
    /// Key that makes resubmitting safe: a job already submitted with it is
    /// returned instead of a new one.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Print the queued job as one JSON object (proto field names).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SubmitZooArgs {
    #[command(flatten)]
    spec: ZooSpec,
    #[command(flatten)]
    options: SubmitOptions,
}

#[derive(Args)]
pub struct SubmitTrainArgs {
    #[command(flatten)]
    spec: TrainSpec,
    #[command(flatten)]
    options: SubmitOptions,
}

/// `weightgen jobs …`.
pub async fn jobs(addr: &str, timeout: Duration, command: JobsCommand) -> ExitCode {
    let (name, result) = match command {
        JobsCommand::SubmitZoo(args) => ("jobs submit-zoo", submit_zoo(addr, timeout, *args).await),
        JobsCommand::SubmitTrain(args) => (
            "jobs submit-train",
            submit_train(addr, timeout, *args).await,
        ),
        JobsCommand::List {
            state,
            kind,
            options,
        } => ("jobs list", list(addr, timeout, state, kind, options).await),
        JobsCommand::Get(GetArgs { id, json }) => ("jobs get", get(addr, timeout, id, json).await),
        JobsCommand::Cancel { id } => ("jobs cancel", cancel(addr, timeout, id).await),
        JobsCommand::Wait { id, poll, max_wait } => {
            ("jobs wait", wait(addr, timeout, id, poll, max_wait).await)
        }
    };
    exit_code(name, result)
}

async fn job_client(
    addr: &str,
    timeout: Duration,
) -> Result<JobServiceClient<weightgen::client::Connection>, Failure> {
    Ok(JobServiceClient::new(
        crate::connect(addr, Some(timeout)).await?,
    ))
}

fn state_name(state: i32) -> String {
    pb::JobState::try_from(state).map_or_else(
        |_| format!("unknown({state})"),
        |s| short_name(s.as_str_name(), "JOB_STATE_"),
    )
}

fn kind_name(kind: i32) -> String {
    pb::JobKind::try_from(kind).map_or_else(
        |_| format!("unknown({kind})"),
        |k| short_name(k.as_str_name(), "JOB_KIND_"),
    )
}

/// What a finished job produced, or "".
fn result_text(job: &pb::Job) -> String {
    match pb::JobKind::try_from(job.kind) {
        Ok(pb::JobKind::TrainDenoiser) if !job.denoiser_id.is_empty() => {
            format!("denoiser {}", job.denoiser_id)
        }
        Ok(pb::JobKind::BuildZoo) if job.state() == pb::JobState::Succeeded => {
            format!("{} models built", job.models_built)
        }
        _ => String::new(),
    }
}

/// The last column of a job's row: its error, result or latest message.
fn note(job: &pb::Job) -> String {
    let result = result_text(job);
    if !job.error.is_empty() {
        format!("error: {}", job.error)
    } else if !result.is_empty() {
        result
    } else {
        job.message.clone()
    }
}

fn progress_text(job: &pb::Job) -> String {
    format!("{:.0}%", (job.progress * 100.0).clamp(0.0, 100.0))
}

fn job_row(job: &pb::Job) -> Vec<String> {
    vec![
        job.id.clone(),
        kind_name(job.kind),
        state_name(job.state),
        progress_text(job),
        format!("{}/{}", job.attempts, job.max_attempts),
        time_text(job.created_at.as_ref()),
        note(job),
    ]
}

const JOB_HEADER: [&str; 7] = [
    "ID", "KIND", "STATE", "PROGRESS", "ATTEMPTS", "CREATED", "NOTE",
];

/// A job's spec as its job row stores it (the field names of `ZooSpec` /
/// `TrainSpec`, which the worker's flags and the proto share).
fn spec_json(job: &pb::Job) -> (&'static str, Value) {
    match &job.spec {
        Some(pb::job::Spec::BuildZoo(s)) => (
            "build_zoo",
            serde_json::to_value(zoo_spec_from_proto(s)).unwrap_or(Value::Null),
        ),
        Some(pb::job::Spec::TrainDenoiser(s)) => (
            "train_denoiser",
            train_spec_from_proto(s)
                .ok()
                .and_then(|spec| serde_json::to_value(spec).ok())
                .unwrap_or(Value::Null),
        ),
        None => ("spec", Value::Null),
    }
}

fn job_json(job: &pb::Job) -> Value {
    let (spec_key, spec) = spec_json(job);
    let mut value = json!({
        "id": job.id,
        "kind": pb::JobKind::try_from(job.kind)
            .map_or_else(|_| json!(job.kind), |k| json!(k.as_str_name())),
        "state": pb::JobState::try_from(job.state)
            .map_or_else(|_| json!(job.state), |s| json!(s.as_str_name())),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "progress": job.progress,
        "message": job.message,
        "error": job.error,
        "worker_id": job.worker_id,
        "created_at": time_json(job.created_at.as_ref()),
        "started_at": time_json(job.started_at.as_ref()),
        "finished_at": time_json(job.finished_at.as_ref()),
        "heartbeat_at": time_json(job.heartbeat_at.as_ref()),
        "denoiser_id": job.denoiser_id,
        "models_built": job.models_built,
    });
    if let Value::Object(fields) = &mut value {
        fields.insert(spec_key.into(), spec);
    }
    value
}

fn spec_text(job: &pb::Job) -> String {
    match &job.spec {
        Some(pb::job::Spec::BuildZoo(s)) => {
            let mut text = format!(
                "build zoo {:?}: {} {} models of {}, seed {}",
                s.zoo,
                s.num_models,
                s.family,
                if s.architecture.is_empty() {
                    "the default architecture"
                } else {
                    &s.architecture
                },
                s.seed
            );
            if s.shared_init {
                text.push_str(", shared init");
            }
            if let Some(steps) = s.steps {
                text.push_str(&format!(", {steps} steps"));
            }
            if let Some(rate) = s.learning_rate {
                text.push_str(&format!(", lr {}", number_text(rate)));
            }
            if s.keep_last_checkpoints > 0 {
                text.push_str(&format!(
                    ", keeping {} checkpoints",
                    s.keep_last_checkpoints
                ));
            }
            text
        }
        Some(pb::job::Spec::TrainDenoiser(s)) => {
            let Ok(spec) = train_spec_from_proto(s) else {
                return "train (a spec this client cannot read)".into();
            };
            let mut text = format!(
                "train {} on zoo {:?}: {} steps, batch {}, lr {}, seed {}",
                spec.kind
                    .to_possible_value()
                    .map_or("?".into(), |v| v.get_name().to_owned()),
                spec.zoo,
                spec.steps,
                spec.batch_size,
                number_text(spec.learning_rate),
                spec.seed
            );
            if !s.denoiser_id.is_empty() {
                text.push_str(&format!(", publishing {}", s.denoiser_id));
            }
            if s.activate {
                text.push_str(", activating it");
            }
            text
        }
        None => "-".into(),
    }
}

fn print_job(job: &pb::Job) {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    print_fields(&[
        ("id", job.id.clone()),
        ("kind", kind_name(job.kind)),
        ("state", state_name(job.state)),
        ("progress", progress_text(job)),
        ("message", or_dash(&job.message)),
        ("error", or_dash(&job.error)),
        ("result", or_dash(&result_text(job))),
        (
            "attempts",
            format!("{} of {}", job.attempts, job.max_attempts),
        ),
        ("worker", or_dash(&job.worker_id)),
        ("spec", spec_text(job)),
        ("created", time_text(job.created_at.as_ref())),
        ("started", time_text(job.started_at.as_ref())),
        ("heartbeat", time_text(job.heartbeat_at.as_ref())),
        ("finished", time_text(job.finished_at.as_ref())),
    ]);
}

async fn submit(
    addr: &str,
    timeout: Duration,
    spec: pb::submit_job_request::Spec,
    options: &SubmitOptions,
) -> Result<ExitCode, Failure> {
    let mut jobs = job_client(addr, timeout).await?;
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            max_attempts: options.max_attempts,
            idempotency_key: options.idempotency_key.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    if options.json {
        print_json(&job_json(&job));
    } else {
        out!(
            "submitted {} ({}, {})",
            job.id,
            kind_name(job.kind),
            state_name(job.state)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn submit_zoo(
    addr: &str,
    timeout: Duration,
    args: SubmitZooArgs,
) -> Result<ExitCode, Failure> {
    // The server validates the spec (one set of rules; errors name the field).
    let spec = pb::submit_job_request::Spec::BuildZoo(zoo_spec_to_proto(&args.spec));
    submit(addr, timeout, spec, &args.options).await
}

async fn submit_train(
    addr: &str,
    timeout: Duration,
    args: SubmitTrainArgs,
) -> Result<ExitCode, Failure> {
    let spec = pb::submit_job_request::Spec::TrainDenoiser(train_spec_to_proto(&args.spec));
    submit(addr, timeout, spec, &args.options).await
}

async fn list(
    addr: &str,
    timeout: Duration,
    state: Option<StateArg>,
    kind: Option<KindArg>,
    ListOptions { limit, json }: ListOptions,
) -> Result<ExitCode, Failure> {
    let jobs = job_client(addr, timeout).await?;
    let state = state.map_or(pb::JobState::Unspecified, pb::JobState::from);
    let kind = kind.map_or(pb::JobKind::Unspecified, pb::JobKind::from);
    let (listed, _) = collect_pages(limit, |page| {
        let mut jobs = jobs.clone();
        let request = pb::ListJobsRequest {
            kind: kind as i32,
            state: state as i32,
            page: Some(page),
        };
        async move {
            let r = jobs.list_jobs(request).await?.into_inner();
            Ok((r.jobs, r.next_page_token, None))
        }
    })
    .await?;
    if json {
        listed.iter().map(job_json).for_each(|j| print_json(&j));
    } else if listed.is_empty() {
        eprintln!("no jobs");
    } else {
        let rows: Vec<Vec<String>> = listed.iter().map(job_row).collect();
        print_table(&JOB_HEADER, &rows);
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(addr: &str, timeout: Duration, id: String, json: bool) -> Result<ExitCode, Failure> {
    let mut jobs = job_client(addr, timeout).await?;
    let job = jobs.get_job(pb::GetJobRequest { id }).await?.into_inner();
    if json {
        print_json(&job_json(&job));
    } else {
        print_job(&job);
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel(addr: &str, timeout: Duration, id: String) -> Result<ExitCode, Failure> {
    let mut jobs = job_client(addr, timeout).await?;
    let job = jobs
        .cancel_job(pb::CancelJobRequest { id })
        .await?
        .into_inner();
    if job.state() == pb::JobState::Cancelled {
        out!("cancelled {}", job.id);
    } else {
        out!("{} already finished: {}", job.id, state_name(job.state));
    }
    Ok(ExitCode::SUCCESS)
}

fn finished(state: pb::JobState) -> bool {
    matches!(
        state,
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
    )
}

/// Errors worth polling through: the server restarting or slow.
fn transient(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded)
}

async fn wait(
    addr: &str,
    timeout: Duration,
    id: String,
    poll: Duration,
    max_wait: Option<Duration>,
) -> Result<ExitCode, Failure> {
    if poll.is_zero() {
        return Err(Failure::Usage("--poll: must be positive".into()));
    }
    let mut jobs = job_client(addr, timeout).await?;
    let started = Instant::now();
    let bar = spinner(format!("{id}: asking"));
    let terminal = on_terminal();
    let mut last_state = None;
    let mut unreachable_since: Option<Instant> = None;
    let outcome = loop {
        match jobs.get_job(pb::GetJobRequest { id: id.clone() }).await {
            Ok(response) => {
                unreachable_since = None;
                let job = response.into_inner();
                let state = job.state();
                if finished(state) {
                    break Ok(job);
                }
                let line = format!(
                    "{id}: {} {} {}",
                    state_name(job.state),
                    progress_text(&job),
                    job.message
                );
                bar.set_message(line.trim_end().to_owned());
                if !terminal && last_state != Some(state) {
                    eprintln!("{id}: {}", state_name(job.state));
                }
                last_state = Some(state);
            }
            Err(status) if transient(status.code()) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= timeout.max(poll) {
                    break Err(Failure::from(status));
                }
                bar.set_message(format!("{id}: retrying ({})", status.message()));
            }
            Err(status) => break Err(Failure::from(status)),
        }
        let mut pause = poll;
        if let Some(max_wait) = max_wait {
            let left = max_wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                let state = last_state.map_or_else(
                    || "unreachable".to_owned(),
                    |s| short_name(s.as_str_name(), "JOB_STATE_"),
                );
                break Err(Failure::Failed(format!(
                    "job {id} is still {state} after {} (--max-wait)",
                    humantime::format_duration(max_wait)
                )));
            }
            pause = pause.min(left);
        }
        tokio::time::sleep(pause).await;
    };
    bar.finish_and_clear();
    let job = outcome?;
    print_table(&JOB_HEADER, &[job_row(&job)]);
    match job.state() {
        pb::JobState::Succeeded => Ok(ExitCode::SUCCESS),
        pb::JobState::Cancelled => Err(Failure::Failed(format!("job {id} was cancelled"))),
        _ => Err(Failure::Failed(format!(
            "job {id} failed after {} of {} attempts: {}",
            job.attempts,
            job.max_attempts,
            if job.error.is_empty() {
                "no reason recorded"
            } else {
                &job.error
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: JobsCommand,
    }

    #[test]
    fn submitted_specs_carry_every_flag_typed() {
        let cli = Cli::try_parse_from([
            "x",
            "submit-train",
            "--zoo",
            "z",
            "--steps",
            "5",
            "--prediction",
            "v",
            "--widths",
            "8,4",
            "--latent",
            "none",
        ])
        .unwrap();
        let JobsCommand::SubmitTrain(args) = cli.command else {
            panic!("submit-train");
        };
        let spec = train_spec_to_proto(&args.spec);
        assert_eq!(spec.steps, Some(5));
        assert_eq!(spec.prediction(), pb::Prediction::V);
        assert_eq!(spec.widths, [8, 4]);
        assert_eq!(spec.latent(), pb::LatentSpace::Weights);
        assert_eq!(train_spec_from_proto(&spec).unwrap(), args.spec);
        // The old flag names still parse.
        let cli = Cli::try_parse_from([
            "x",
            "submit-zoo",
            "--family",
            "digits",
            "--num-models",
            "3",
            "--keep-last-checkpoints",
            "2",
        ])
        .unwrap();
        let JobsCommand::SubmitZoo(args) = cli.command else {
            panic!("submit-zoo");
        };
        assert_eq!((args.spec.num_models, args.spec.keep_snapshots), (3, 2));
    }
}
