//! `weightgen denoisers …`: the denoiser versions of the server's
//! CatalogService from the command line: list, get, download, activate.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use indicatif::HumanBytes;
use serde_json::{Value, json};
use weightgen::proto::v1 as pb;

use crate::models::{DownloadArgs, download};
use crate::output::{
    Failure, GetArgs, ListOptions, catalog_client, collect_pages, exit_code, metrics_json,
    number_text, out, print_fields, print_json, print_metrics, print_table, short_name, time_json,
    time_text,
};
use pb::download_checkpoint_request::Target;

// JSON forms (proto field names, enums by name, timestamps in RFC 3339)

fn schema_json(s: &pb::FeatureSchema) -> Value {
    json!({
        "features": s.features.iter().map(|f| json!({
            "name": f.name,
            "description": f.description,
            "length": f.length,
            "min": f.min,
            "max": f.max,
            "required": f.required,
        })).collect::<Vec<_>>(),
        "embedding_dim": s.embedding_dim,
        "support": s.support.as_ref().map_or(Value::Null, |s| json!({
            "input_shape": s.input_shape,
            "target_shape": s.target_shape,
            "classification": s.classification,
            "min_examples": s.min_examples,
            "max_examples": s.max_examples,
            "required": s.required,
        })),
    })
}

fn sampler_name(sampler: i32) -> String {
    pb::Sampler::try_from(sampler).map_or_else(
        |_| format!("unknown({sampler})"),
        |s| short_name(s.as_str_name(), "SAMPLER_"),
    )
}

fn denoiser_json(d: &pb::DenoiserInfo) -> Value {
    json!({
        "id": d.id,
        "version": d.version,
        "architecture": d.architecture,
        "active": d.active,
        "feature_schema": d.feature_schema.as_ref().map_or(Value::Null, schema_json),
        "timesteps": d.timesteps,
        "schedule": d.schedule,
        "kind": d.kind,
        "latent_dim": d.latent_dim,
        "latent_space": d.latent_space,
        "default_sampler": pb::Sampler::try_from(d.default_sampler)
            .map_or_else(|_| json!(d.default_sampler), |s| json!(s.as_str_name())),
        "default_steps": d.default_steps,
        "default_guidance": d.default_guidance,
        "metrics": metrics_json(&d.metrics),
        "zoo_models": d.zoo_models,
        "config_json": d.config_json,
        "sha256": d.sha256,
        "size_bytes": d.size_bytes,
        "created_at": time_json(d.created_at.as_ref()),
    })
}

#[derive(Subcommand)]
pub enum DenoisersCommand {
    /// List denoiser versions, newest first, following every page up to
    /// --limit; "*" marks the active one of each architecture.
    List {
        /// Only denoisers of this architecture.
        #[arg(long)]
        architecture: Option<String>,
        #[command(flatten)]
        options: ListOptions,
    },
    /// Describe one denoiser version: architecture, variant, schedule,
    /// feature schema, metrics, checksum.
    Get(GetArgs),
    /// Download a denoiser's checkpoint file; its size and SHA-256 are
    /// checked against what the server reports before the file is written.
    Download(DownloadArgs),
    /// Make a denoiser version the active one for its architecture (also to
    /// roll back); running servers swap it in without a restart.
    Activate {
        /// Denoiser id.
        id: String,
    },
}

/// `weightgen denoisers …`.
pub async fn denoisers(addr: &str, timeout: Duration, command: DenoisersCommand) -> ExitCode {
    let (name, result) = match command {
        DenoisersCommand::List {
            architecture,
            options,
        } => (
            "denoisers list",
            list_denoisers(addr, timeout, architecture, options).await,
        ),
        DenoisersCommand::Get(GetArgs { id, json }) => {
            ("denoisers get", get_denoiser(addr, timeout, id, json).await)
        }
        DenoisersCommand::Download(args) => (
            "denoisers download",
            download(addr, timeout, Target::DenoiserId(args.id), args.output).await,
        ),
        DenoisersCommand::Activate { id } => (
            "denoisers activate",
            activate_denoiser(addr, timeout, id).await,
        ),
    };
    exit_code(name, result)
}

async fn list_denoisers(
    addr: &str,
    timeout: Duration,
    architecture: Option<String>,
    ListOptions { limit, json }: ListOptions,
) -> Result<ExitCode, Failure> {
    let catalog = catalog_client(addr, Some(timeout)).await?;
    let (denoisers, _) = collect_pages(limit, |page| {
        let mut catalog = catalog.clone();
        let request = pb::ListDenoisersRequest {
            architecture: architecture.clone().unwrap_or_default(),
            page: Some(page),
        };
        async move {
            let r = catalog.list_denoisers(request).await?.into_inner();
            Ok((r.denoisers, r.next_page_token, None))
        }
    })
    .await?;
    if json {
        denoisers
            .iter()
            .map(denoiser_json)
            .for_each(|d| print_json(&d));
        return Ok(ExitCode::SUCCESS);
    }
    if denoisers.is_empty() {
        eprintln!("no denoisers");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = denoisers
        .iter()
        .map(|d| {
            vec![
                if d.active { "*" } else { "" }.to_owned(),
                d.id.clone(),
                format!("v{}", d.version),
                d.architecture.clone(),
                d.kind.clone(),
                d.zoo_models.to_string(),
                HumanBytes(d.size_bytes).to_string(),
                time_text(d.created_at.as_ref()),
            ]
        })
        .collect();
    print_table(
        &[
            "",
            "ID",
            "VERSION",
            "ARCHITECTURE",
            "KIND",
            "ZOO MODELS",
            "SIZE",
            "CREATED",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

fn schema_text(schema: &pb::FeatureSchema) -> String {
    let mut parts: Vec<String> = schema
        .features
        .iter()
        .map(|f| {
            format!(
                "{}[{}]{} in [{}, {}]",
                f.name,
                f.length,
                if f.required { "" } else { "?" },
                number_text(f.min),
                number_text(f.max)
            )
        })
        .collect();
    if schema.embedding_dim > 0 {
        parts.push(format!("embedding[{}]", schema.embedding_dim));
    }
    if let Some(s) = &schema.support {
        parts.push(format!(
            "support {}-{} × {:?}{}",
            s.min_examples,
            s.max_examples,
            s.input_shape,
            if s.required { "" } else { "?" }
        ));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn print_denoiser(d: &pb::DenoiserInfo) {
    print_fields(&[
        ("id", d.id.clone()),
        ("version", d.version.to_string()),
        ("architecture", d.architecture.clone()),
        ("active", d.active.to_string()),
        ("kind", d.kind.clone()),
        (
            "diffusion",
            format!(
                "T={}, {} schedule, latent {}",
                d.timesteps,
                if d.schedule.is_empty() {
                    "unknown"
                } else {
                    &d.schedule
                },
                match (d.latent_space.as_str(), d.latent_dim) {
                    (_, 0) => "none (the weights)".to_owned(),
                    ("", k) => format!("dim {k}"),
                    (space, k) => format!("{space}, dim {k}"),
                }
            ),
        ),
        (
            "sampling default",
            format!(
                "{} {} steps, guidance {}",
                sampler_name(d.default_sampler),
                d.default_steps,
                d.default_guidance
            ),
        ),
        (
            "features",
            d.feature_schema
                .as_ref()
                .map_or_else(|| "-".into(), schema_text),
        ),
        ("zoo models", d.zoo_models.to_string()),
        (
            "size",
            format!("{} ({} bytes)", HumanBytes(d.size_bytes), d.size_bytes),
        ),
        ("sha256", d.sha256.clone()),
        ("created", time_text(d.created_at.as_ref())),
    ]);
    print_metrics(&d.metrics);
}

async fn get_denoiser(
    addr: &str,
    timeout: Duration,
    id: String,
    json: bool,
) -> Result<ExitCode, Failure> {
    let mut catalog = catalog_client(addr, Some(timeout)).await?;
    let d = catalog
        .get_denoiser(pb::GetDenoiserRequest { id })
        .await?
        .into_inner();
    if json {
        print_json(&denoiser_json(&d));
    } else {
        print_denoiser(&d);
    }
    Ok(ExitCode::SUCCESS)
}

async fn activate_denoiser(addr: &str, timeout: Duration, id: String) -> Result<ExitCode, Failure> {
    let mut catalog = catalog_client(addr, Some(timeout)).await?;
    let d = catalog
        .activate_denoiser(pb::ActivateDenoiserRequest { id })
        .await?
        .into_inner();
    out!("activated {} (v{}) for {}", d.id, d.version, d.architecture);
    Ok(ExitCode::SUCCESS)
}
