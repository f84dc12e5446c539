//! `weightgen generate`: flags to a GenerateInit request, streamed files to disk.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use weightgen::client::{self, TaskFile};
use weightgen::proto::v1 as pb;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A task file (from `weightgen task`): architecture, features, support
    /// set and class count; the flags below override what it says.
    #[arg(long)]
    task: Option<PathBuf>,
    /// Architecture to generate weights for (required without --task).
    #[arg(long, required_unless_present = "task")]
    architecture: Option<String>,
    /// A task feature, NAME=V1,V2,… (repeat for each feature).
    #[arg(long = "feature", value_name = "NAME=VALUES")]
    features: Vec<String>,
    /// Few-shot support set: a JSON file {"inputs": [[…], …], "targets": [label, …] or [[…], …]}.
    #[arg(long)]
    support: Option<PathBuf>,
    /// Number of classes of a classification task.
    #[arg(long)]
    num_classes: Option<u32>,
    /// Initializations to generate.
    #[arg(long, default_value_t = 1)]
    samples: u32,
    /// auto (the sampling the denoiser's training chose on validation
    /// tasks), ddim, dpm-solver (DPM-Solver++(2M), for few steps) or ddpm.
    #[arg(long, default_value = "auto")]
    sampler: String,
    /// Reverse steps (default: the denoiser's choice for its sampler, else
    /// DDIM and DPM-Solver 10, DDPM T).
    #[arg(long)]
    steps: Option<u32>,
    /// DDIM stochasticity in [0, 1].
    #[arg(long)]
    eta: Option<f32>,
    /// Classifier-free guidance scale (1 = plain conditional sampling;
    /// default: the denoiser's choice for its sampler, else 1).
    #[arg(long)]
    guidance: Option<f32>,
    /// Seed (default: drawn by the server and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Redraw a sample that comes out closer to a zoo model than the zoo's
    /// models are to each other, at most this many times (0: never; ≤ 8).
    #[arg(long, default_value_t = 0)]
    max_redraws: u32,
    /// Pin one loaded denoiser version instead of the active one.
    #[arg(long)]
    denoiser_id: Option<String>,
    /// Output file; with several samples, NAME-0.safetensors, NAME-1.safetensors, …
    #[arg(short, long)]
    output: PathBuf,
}

/// `--sampler`: auto (the denoiser's recommendation), ddim, dpm-solver or ddpm.
pub fn parse_sampler(name: &str) -> Result<pb::Sampler, String> {
    match name {
        "auto" => Ok(pb::Sampler::Unspecified),
        "ddim" => Ok(pb::Sampler::Ddim),
        "dpm-solver" => Ok(pb::Sampler::DpmSolver),
        "ddpm" => Ok(pb::Sampler::Ddpm),
        other => Err(format!(
            "--sampler {other:?}: expected auto, ddim, dpm-solver or ddpm"
        )),
    }
}

/// The GenerateInit request the flags describe (errors name the flag).
fn generate_request(args: &GenerateArgs) -> Result<pb::GenerateInitRequest, String> {
    let mut task = match &args.task {
        Some(path) => TaskFile::read(path)
            .map_err(|e| format!("--task {e}"))?
            .to_proto(),
        None => pb::TaskDescriptor::default(),
    };
    if let Some(architecture) = &args.architecture {
        task.architecture = architecture.clone();
    }
    if let Some(num_classes) = args.num_classes {
        task.num_classes = num_classes;
    }
    for arg in &args.features {
        let (name, values) = arg
            .split_once('=')
            .ok_or_else(|| format!("--feature {arg:?}: expected NAME=V1,V2,…"))?;
        let values = values
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--feature {name}: {e}"))?;
        task.features
            .insert(name.to_owned(), pb::FeatureValue { values });
    }
    if let Some(path) = &args.support {
        task.support =
            Some(support_set(path).map_err(|e| format!("--support {}: {e}", path.display()))?);
    }
    let sampler = parse_sampler(&args.sampler)?;
    let dtype = match args.dtype.as_str() {
        "f32" => pb::DType::DtypeF32,
        "f16" => pb::DType::DtypeF16,
        "bf16" => pb::DType::DtypeBf16,
        other => return Err(format!("--dtype {other:?}: expected f32, f16 or bf16")),
    };
    Ok(pb::GenerateInitRequest {
        task: Some(task),
        options: Some(pb::SamplingOptions {
            num_samples: args.samples,
            sampler: sampler as i32,
            steps: args.steps.unwrap_or(0),
            eta: args.eta,
            guidance_scale: args.guidance,
            seed: args.seed,
            output_dtype: dtype as i32,
            max_redraws: args.max_redraws,
        }),
        denoiser_id: args.denoiser_id.clone().unwrap_or_default(),
    })
}

/// A support set from JSON: rows of inputs, and class labels or rows of targets.
fn support_set(path: &std::path::Path) -> Result<pb::SupportSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let tensor = |key: &str| -> Result<pb::FloatTensor, String> {
        let rows = json[key]
            .as_array()
            .ok_or_else(|| format!("{key:?} must be an array"))?;
        let mut values = Vec::new();
        let mut width = None;
        for (i, row) in rows.iter().enumerate() {
            let row: Vec<f32> = match row {
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| format!("{key}[{i}] must hold numbers"))?,
                other => vec![
                    other
                        .as_f64()
                        .ok_or_else(|| format!("{key}[{i}] must be a number"))?
                        as f32,
                ],
            };
            let first = *width.get_or_insert(row.len());
            if first != row.len() {
                return Err(format!(
                    "{key}[{i}] has {} values, the first row {first}",
                    row.len()
                ));
            }
            values.extend(row);
        }
        let shape = if rows.iter().all(|r| !r.is_array()) {
            vec![rows.len() as u64]
        } else {
            vec![rows.len() as u64, width.unwrap_or(0) as u64]
        };
        Ok(pb::FloatTensor { shape, values })
    };
    Ok(pb::SupportSet {
        inputs: Some(tensor("inputs")?),
        targets: Some(tensor("targets")?),
    })
}

/// Writes the generated files; returns their paths.
fn write_samples(output: &std::path::Path, files: &[Vec<u8>]) -> Result<Vec<PathBuf>, String> {
    let paths: Vec<PathBuf> = if files.len() == 1 {
        vec![output.to_path_buf()]
    } else {
        let stem = output
            .file_stem()
            .map_or_else(|| "init".into(), |s| s.to_string_lossy().into_owned());
        let ext = output.extension().map_or_else(
            || "safetensors".into(),
            |e| e.to_string_lossy().into_owned(),
        );
        (0..files.len())
            .map(|i| output.with_file_name(format!("{stem}-{i}.{ext}")))
            .collect()
    };
    for (path, bytes) in paths.iter().zip(files) {
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(paths)
}

/// ", nearest zoo model: cosine c, L2 l[, redrawn r×][, TOO CLOSE]".
fn nearness_text(n: &pb::NearestZoo) -> String {
    let mut text = format!(
        ", nearest zoo model: cosine {:.3}, L2 {:.3}",
        n.cosine, n.l2
    );
    if n.redraws > 0 {
        text.push_str(&format!(", redrawn {}×", n.redraws));
    }
    if n.too_close {
        text.push_str(", TOO CLOSE to a zoo model");
    }
    text
}

pub async fn generate(
    addr: &str,
    timeout: Duration,
    args: GenerateArgs,
) -> Result<ExitCode, client::ClientError> {
    let request = match generate_request(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weightgen: generate: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let channel = crate::connect(addr, Some(timeout)).await?;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message("sampling");
    bar.enable_steady_tick(Duration::from_millis(120));
    let shown = bar.clone();
    let generated = client::generate(channel, request, move |bytes| {
        shown.set_message(format!("receiving: {bytes} bytes"));
    })
    .await;
    bar.finish_and_clear();
    let generated = generated?;
    let paths = match write_samples(&args.output, &generated.files) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("weightgen: generate: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    for (path, digest) in paths.iter().zip(&generated.trailer.samples) {
        println!(
            "wrote {} ({} bytes, sha256 {}){}",
            path.display(),
            digest.size_bytes,
            digest.sha256,
            digest
                .nearest_zoo
                .as_ref()
                .map(nearness_text)
                .unwrap_or_default()
        );
    }
    if let Some(spread) = &generated.trailer.zoo_spread {
        println!(
            "zoo spread ({} models): nearest-neighbour cosine mean {:.3}; too close above cosine {:.3} or below L2 {:.3}",
            spread.reference_models,
            spread.mean_cosine,
            spread.too_close_cosine,
            spread.too_close_l2
        );
    }
    let h = &generated.header;
    let sampler = match pb::Sampler::try_from(h.sampler) {
        Ok(pb::Sampler::Ddpm) => "DDPM",
        Ok(pb::Sampler::DpmSolver) => "DPM-Solver++(2M)",
        _ => "DDIM",
    };
    println!(
        "denoiser {} v{} ({}), seed {}, {sampler} {} steps, guidance {}, batch {}, sampling {:.1} ms",
        h.denoiser_id,
        h.denoiser_version,
        h.architecture.as_ref().map_or("", |a| a.name.as_str()),
        h.seed,
        h.steps,
        h.guidance_scale,
        generated.trailer.batch_size,
        generated.trailer.sampling_ms
    );
    Ok(ExitCode::SUCCESS)
}
