//! `weightgen task`: a built-in family's task as a task file (descriptor
//! from the shared featurizer, plus the task's data).

use std::path::PathBuf;

use rand::SeedableRng;
use rand::rngs::StdRng;
use weightgen::client::TaskFile;
use weightgen::tasks::{Family, TaskSpec};

#[derive(clap::Args)]
pub struct TaskArgs {
    /// Task family: sinusoid, digits, digit-inr or words.
    #[arg(long)]
    pub family: String,
    /// Architecture (default: the family's first).
    #[arg(long)]
    pub architecture: Option<String>,
    /// digits: the classes in label order, e.g. 3,5,6,8,9.
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<u8>>,
    /// sinusoid: amplitude.
    #[arg(long, requires = "phase")]
    pub amplitude: Option<f64>,
    /// sinusoid: phase.
    #[arg(long, requires = "amplitude")]
    pub phase: Option<f64>,
    /// digit-inr: index of the image.
    #[arg(long)]
    pub image: Option<usize>,
    /// words: the language (a wordfreq code, e.g. en).
    #[arg(long)]
    pub language: Option<String>,
    /// words: a second language, mixed with the first.
    #[arg(long, requires = "language")]
    pub second: Option<String>,
    /// words: the first language's weight in a mixture, in (0, 1).
    #[arg(long, requires = "second")]
    pub alpha: Option<f64>,
    /// words: example words in the support set (drawn by frequency from
    /// the task's training words; reads WEIGHTGEN_WORDS_DIR).
    #[arg(long, default_value_t = weightgen::zoo::words::WORDS_SUPPORT)]
    pub examples: usize,
    /// Instead of a given task, a random held-out one (no zoo model saw
    /// it), drawn from this seed.
    #[arg(long, conflicts_with_all = ["classes", "amplitude", "image", "language"])]
    pub held_out_seed: Option<u64>,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// The family, its architecture and the asked task.
pub fn resolve(args: &TaskArgs) -> Result<(Family, String, TaskSpec), String> {
    let family = Family::parse(&args.family).map_err(|e| format!("--family: {e}"))?;
    // An empty name picks the family's first architecture.
    let architecture = family
        .network(args.architecture.as_deref().unwrap_or_default())
        .map_err(|e| format!("--architecture: {e}"))?
        .spec
        .name;
    let task = match (family, args.held_out_seed) {
        (_, Some(seed)) => family.sample_task(&mut StdRng::seed_from_u64(seed), true),
        (Family::Digits, None) => TaskSpec::Digits {
            classes: args
                .classes
                .clone()
                .ok_or("--classes is required for digits")?,
        },
        (Family::Sinusoid, None) => TaskSpec::Sinusoid {
            amplitude: args
                .amplitude
                .ok_or("--amplitude and --phase are required for sinusoid")?,
            phase: args.phase.unwrap_or_default(),
        },
        (Family::DigitInr, None) => TaskSpec::DigitInr {
            image: args.image.ok_or("--image is required for digit-inr")?,
        },
        (Family::Words, None) => TaskSpec::Words {
            language: args
                .language
                .clone()
                .ok_or("--language is required for words")?,
            alpha: match (&args.second, args.alpha) {
                (None, _) => 1.0,
                (Some(_), alpha) => alpha.ok_or("--alpha is required with --second")?,
            },
            second: args.second.clone(),
        },
    };
    family.validate(&task).map_err(|e| format!("task: {e}"))?;
    Ok((family, architecture, task))
}

/// Writes the task file; returns a line describing it.
pub fn task(args: &TaskArgs) -> Result<String, String> {
    let (family, architecture, task) = resolve(args)?;
    let file = match family {
        Family::Words => {
            let lists =
                weightgen::tasks::words::WordLists::from_env().map_err(|e| e.to_string())?;
            TaskFile::of_words_task(&architecture, &task, &lists, args.examples, 0)
                .map_err(|e| e.to_string())?
        }
        _ => TaskFile::of_task(family, &architecture, &task).map_err(|e| e.to_string())?,
    };
    file.write(&args.output).map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {}: {} task {} for {architecture} ({} features, {} support examples{})",
        args.output.display(),
        family.name(),
        serde_json::to_string(&task).unwrap_or_default(),
        file.features.len(),
        file.support.as_ref().map_or(0, |s| s.inputs.len()),
        if family.is_held_out(&task) {
            ", held out"
        } else {
            ""
        }
    ))
}
