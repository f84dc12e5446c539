//! `weightgen architectures`: the architectures registered in the server's
//! CatalogService.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};
use weightgen::proto::v1 as pb;

use crate::output::{Failure, catalog_client, exit_code, print_json, print_table};

// JSON forms (proto field names, enums by name, timestamps in RFC 3339)

fn architecture_json(a: &pb::ArchitectureSpec) -> Value {
    json!({
        "name": a.name,
        "family": a.family,
        "num_parameters": a.num_parameters,
        "tensors": a.tensors.iter().map(|t| json!({
            "name": t.name,
            "shape": t.shape,
            "dtype": pb::DType::try_from(t.dtype).map_or("DTYPE_UNSPECIFIED", |d| d.as_str_name()),
            "layer": t.layer,
        })).collect::<Vec<_>>(),
        "layers": a.layers.iter().map(|l| json!({
            "name": l.name,
            "kind": l.kind,
            "tensors": l.tensors,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Args)]
pub struct ArchitecturesArgs {
    /// Only the architectures of this task family, e.g. "digits".
    #[arg(long)]
    family: Option<String>,
    /// Print one JSON object per architecture and line, with its tensors and
    /// layers (proto field names).
    #[arg(long)]
    json: bool,
}

/// `weightgen architectures`.
pub async fn architectures(addr: &str, timeout: Duration, args: ArchitecturesArgs) -> ExitCode {
    exit_code(
        "architectures",
        list_architectures(addr, timeout, args).await,
    )
}

async fn list_architectures(
    addr: &str,
    timeout: Duration,
    args: ArchitecturesArgs,
) -> Result<ExitCode, Failure> {
    let mut catalog = catalog_client(addr, Some(timeout)).await?;
    let archs = catalog
        .list_architectures(pb::ListArchitecturesRequest {
            family: args.family.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .architectures;
    if args.json {
        archs
            .iter()
            .map(architecture_json)
            .for_each(|a| print_json(&a));
    } else if archs.is_empty() {
        eprintln!("no architectures registered");
    } else {
        let rows: Vec<Vec<String>> = archs
            .iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    if a.family.is_empty() {
                        "-".into()
                    } else {
                        a.family.clone()
                    },
                    a.num_parameters.to_string(),
                    a.tensors.len().to_string(),
                    a.layers.len().to_string(),
                ]
            })
            .collect();
        print_table(
            &["NAME", "FAMILY", "PARAMETERS", "TENSORS", "LAYERS"],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}
