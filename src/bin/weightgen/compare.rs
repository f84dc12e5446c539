//! `weightgen compare`: inits requested over gRPC against random inits on
//! the same tasks — zero-shot score and fine-tuning steps to 90% of the
//! fully trained result (random init trained for `--full-steps`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use weightgen::client::{self, TaskFile};
use weightgen::eval::{
    DEFAULT_TARGET_FRACTION, FinetuneConfig, curve, params_from_safetensors, steps_to_target,
    target_of,
};
use weightgen::proto::v1 as pb;
use weightgen::tasks::{Family, Objective};

use crate::generate::parse_sampler;

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Task files to compare on (from `weightgen task`); without any,
    /// `--held-out` random held-out tasks of `--family`.
    #[arg(long = "task")]
    pub tasks: Vec<PathBuf>,
    /// Family of the held-out tasks.
    #[arg(long, default_value = "digits")]
    pub family: String,
    /// Architecture (default: the family's first).
    #[arg(long)]
    pub architecture: Option<String>,
    /// Number of held-out tasks.
    #[arg(long, default_value_t = 5)]
    pub held_out: usize,
    /// Seed of the held-out tasks, the sampling and the random inits.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto (the denoiser's recommended sampling), ddim, dpm-solver or ddpm.
    #[arg(long, default_value = "auto")]
    pub sampler: String,
    /// Classifier-free guidance scale (default: the denoiser's choice for
    /// its sampler, else 1).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Adam learning rate of fine-tuning (both inits).
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    /// Fine-tuning steps measured for each init.
    #[arg(long, default_value_t = 300)]
    pub finetune_steps: usize,
    /// Steps that train random init "fully": the reference result.
    #[arg(long, default_value_t = 1000)]
    pub full_steps: usize,
    /// What each request carries of the task file: both (features and
    /// support set), features (no support set: the `generate --feature`
    /// request) or support (the support set alone).
    #[arg(long, default_value = "both", hide_possible_values = true)]
    pub form: RequestForm,
}

/// Which parts of a task descriptor a request sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestForm {
    /// Features and support set.
    Both,
    /// Features only.
    Features,
    /// Support set only.
    Support,
}

impl RequestForm {
    /// `task` with what this form leaves out removed.
    fn apply(self, mut task: pb::TaskDescriptor) -> pb::TaskDescriptor {
        match self {
            Self::Both => {}
            Self::Features => task.support = None,
            Self::Support => task.features.clear(),
        }
        task
    }
}

/// One task's figures.
struct Row {
    name: String,
    zero_shot: (f64, f64),
    steps: (Option<usize>, Option<usize>),
    full: f64,
}

fn tasks(args: &CompareArgs) -> Result<Vec<(Family, TaskFile)>, String> {
    if !args.tasks.is_empty() {
        return args
            .tasks
            .iter()
            .map(|path| {
                let file = TaskFile::read(path).map_err(|e| e.to_string())?;
                let family = file
                    .task
                    .as_ref()
                    .map(|t| t.family())
                    .ok_or_else(|| format!("{}: names no built-in task", path.display()))?;
                Ok((family, file))
            })
            .collect();
    }
    let family = Family::parse(&args.family).map_err(|e| format!("--family: {e}"))?;
    // An empty name picks the family's first architecture.
    let architecture = family
        .network(args.architecture.as_deref().unwrap_or_default())
        .map_err(|e| format!("--architecture: {e}"))?
        .spec
        .name;
    let mut rng = StdRng::seed_from_u64(args.seed);
    (0..args.held_out)
        .map(|_| {
            let task = family.sample_task(&mut rng, true);
            let file =
                TaskFile::of_task(family, &architecture, &task).map_err(|e| e.to_string())?;
            Ok((family, file))
        })
        .collect()
}

fn show_steps(steps: Option<usize>, limit: usize) -> String {
    steps.map_or_else(|| format!(">{limit}"), |s| s.to_string())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub async fn compare(
    addr: &str,
    timeout: Duration,
    args: CompareArgs,
) -> Result<ExitCode, client::ClientError> {
    let fail = |e: String| {
        eprintln!("weightgen: compare: {e}");
        Ok(ExitCode::FAILURE)
    };
    let sampler = match parse_sampler(&args.sampler) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let tasks = match tasks(&args) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let channel = crate::connect(addr, Some(timeout)).await?;
    let mut rows = Vec::new();
    let mut objective = Objective::Classification;
    for (i, (family, file)) in tasks.iter().enumerate() {
        let net = match family.network(&file.architecture) {
            Ok(n) => n,
            Err(e) => return fail(e.to_string()),
        };
        let (task_objective, data) = match file.task_data(tch::Device::Cpu) {
            Ok(d) => d,
            Err(e) => return fail(e.to_string()),
        };
        objective = task_objective;
        let seed = args.seed.wrapping_add(i as u64);
        let request = pb::GenerateInitRequest {
            task: Some(args.form.apply(file.to_proto())),
            options: Some(pb::SamplingOptions {
                num_samples: 1,
                sampler: sampler as i32,
                guidance_scale: args.guidance,
                seed: Some(seed),
                ..Default::default()
            }),
            denoiser_id: String::new(),
        };
        let generated = client::generate(channel.clone(), request, |_| {}).await?;
        let Some(bytes) = generated.files.first() else {
            return fail("the server sent no file".into());
        };
        let generated_init = match params_from_safetensors(&net, bytes) {
            Ok(p) => p,
            Err(e) => return fail(format!("generated file: {e}")),
        };
        let random_init = net.init(seed, tch::Device::Cpu);
        let run = |init: &[tch::Tensor], steps: usize| {
            let config = FinetuneConfig {
                steps,
                learning_rate: args.learning_rate,
            };
            curve(&net, init, &data, objective, &config).map_err(|e| e.to_string())
        };
        let (generated_curve, random_curve) = match (
            run(&generated_init, args.finetune_steps),
            run(&random_init, args.full_steps.max(args.finetune_steps)),
        ) {
            (Ok(g), Ok(r)) => (g, r),
            (Err(e), _) | (_, Err(e)) => return fail(e),
        };
        let full = random_curve.last().copied().unwrap_or(f64::NAN);
        let target = target_of(objective, full, DEFAULT_TARGET_FRACTION);
        let within = &random_curve[..=args.finetune_steps.min(random_curve.len() - 1)];
        rows.push(Row {
            name: serde_json::to_string(&file.task).unwrap_or_default(),
            zero_shot: (generated_curve[0], random_curve[0]),
            steps: (
                steps_to_target(&generated_curve, objective, target),
                steps_to_target(within, objective, target),
            ),
            full,
        });
    }
    let metric = objective.label();
    println!(
        "held-out tasks: {} ({:?} form of the request, {} at lr {}, fully trained = random init after {} steps, target {:.0}% of it)",
        rows.len(),
        args.form,
        if args.sampler == "auto" {
            "the denoiser's recommended sampling".to_owned()
        } else {
            args.sampler.to_uppercase()
        },
        args.learning_rate,
        args.full_steps,
        DEFAULT_TARGET_FRACTION * 100.0
    );
    println!(
        "{:<44} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "task",
        "0-shot gen",
        "0-shot rand",
        "steps gen",
        "steps rand",
        format!("full {metric}")
    );
    for row in &rows {
        println!(
            "{:<44} {:>12.3} {:>12.3} {:>10} {:>10} {:>10.3}",
            row.name,
            row.zero_shot.0,
            row.zero_shot.1,
            show_steps(row.steps.0, args.finetune_steps),
            show_steps(row.steps.1, args.finetune_steps),
            row.full
        );
    }
    // Unreached targets count as the step budget: a lower bound for them.
    let cap = |s: Option<usize>| s.unwrap_or(args.finetune_steps) as f64;
    let mean = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / rows.len() as f64;
    let (median_generated, median_random) = (
        median(rows.iter().map(|r| cap(r.steps.0)).collect()),
        median(rows.iter().map(|r| cap(r.steps.1)).collect()),
    );
    println!(
        "{:<44} {:>12.3} {:>12.3} {:>10} {:>10} {:>10.3}",
        "mean 0-shot / median steps",
        mean(&|r| r.zero_shot.0),
        mean(&|r| r.zero_shot.1),
        median_generated,
        median_random,
        mean(&|r| r.full)
    );
    println!(
        "zero-shot {metric}: generated {:.3}, random {:.3}; median steps to target: generated {median_generated}, random {median_random} ({})",
        mean(&|r| r.zero_shot.0),
        mean(&|r| r.zero_shot.1),
        if median_generated < median_random {
            format!("{:.1}x fewer", median_random / median_generated.max(1.0))
        } else {
            "no speed-up".to_owned()
        }
    );
    Ok(ExitCode::SUCCESS)
}
