//! `weightgen doctor`: checks a deployment end to end — connection, health,
//! the server's build and device, the catalog, a loaded denoiser, and one
//! real one-step sample per active denoiser of a built-in family — and says
//! which check failed and why. Exit 0 only when none failed.

use std::process::ExitCode;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tonic_health::pb::health_check_response::ServingStatus;
use weightgen::client::{self, Connection, TaskFile};
use weightgen::proto::v1::catalog_service_client::CatalogServiceClient;
use weightgen::proto::v1::{self as pb, DenoiserInfo};
use weightgen::tasks::Family;

/// The health service that is SERVING once a denoiser is loaded.
const GENERATION_SERVICE: &str = "weightgen.v1.GenerationService";

/// How a check ended.
enum Outcome {
    Passed(String),
    Failed(String),
    /// Not applicable here, with the reason (not a failure).
    Skipped(String),
}

/// The checks run so far, printed as they end.
#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn record(&mut self, check: &str, outcome: Outcome) {
        let (mark, detail) = match outcome {
            Outcome::Passed(d) => ("ok  ", d),
            Outcome::Failed(d) => {
                self.failed += 1;
                ("FAIL", d)
            }
            Outcome::Skipped(d) => ("skip", d),
        };
        println!("{mark}  {check:<12} {detail}");
    }

    fn exit_code(&self) -> ExitCode {
        if self.failed == 0 {
            println!("all checks passed");
            ExitCode::SUCCESS
        } else {
            println!("{} check(s) failed", self.failed);
            ExitCode::FAILURE
        }
    }
}

fn serving(check: Result<ServingStatus, client::ClientError>) -> Outcome {
    match check {
        Ok(ServingStatus::Serving) => Outcome::Passed("SERVING".into()),
        Ok(status) => Outcome::Failed(status.as_str_name().into()),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// `weightgen doctor`.
pub async fn doctor(addr: &str, timeout: Duration) -> ExitCode {
    let mut report = Report::default();
    let channel = match crate::connect(addr, Some(timeout)).await {
        Ok(channel) => {
            report.record("connection", Outcome::Passed(addr.to_owned()));
            channel
        }
        Err(e) => {
            report.record("connection", Outcome::Failed(e.to_string()));
            return report.exit_code();
        }
    };
    report.record(
        "health",
        serving(client::health_status(channel.clone(), "").await),
    );
    report.record(
        "server",
        match client::server_metadata(channel.clone()).await {
            Ok(m) => Outcome::Passed(format!(
                "{} {}, torch {}, device {}",
                m.name, m.version, m.torch_version, m.device
            )),
            Err(e) => Outcome::Failed(e.to_string()),
        },
    );
    report.record(
        "denoiser",
        serving(client::health_status(channel.clone(), GENERATION_SERVICE).await),
    );
    let active = match active_denoisers(&channel).await {
        Ok((architectures, active)) => {
            report.record(
                "catalog",
                Outcome::Passed(format!(
                    "{architectures} architecture(s), {} active denoiser(s)",
                    active.len()
                )),
            );
            if active.is_empty() {
                report.record(
                    "sample",
                    Outcome::Skipped("no active denoiser to sample".into()),
                );
            }
            active
        }
        Err(status) => {
            report.record(
                "catalog",
                Outcome::Failed(client::ClientError::Rpc(status).to_string()),
            );
            report.record(
                "sample",
                Outcome::Skipped("the catalog did not say which denoisers are active".into()),
            );
            Vec::new()
        }
    };
    for denoiser in &active {
        report.record(
            &format!("sample {}", denoiser.info.id),
            one_step_sample(&channel, denoiser).await,
        );
    }
    report.exit_code()
}

/// An active denoiser and its architecture's task family.
struct Active {
    info: DenoiserInfo,
    family: String,
}

/// The number of registered architectures and the active denoisers (every
/// page of the listing).
async fn active_denoisers(channel: &Connection) -> Result<(usize, Vec<Active>), tonic::Status> {
    let mut catalog = CatalogServiceClient::new(channel.clone());
    let architectures = catalog
        .list_architectures(pb::ListArchitecturesRequest::default())
        .await?
        .into_inner()
        .architectures;
    let mut denoisers = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = catalog
            .list_denoisers(pb::ListDenoisersRequest {
                architecture: String::new(),
                page: Some(pb::PageRequest {
                    page_size: 0,
                    page_token,
                }),
            })
            .await?
            .into_inner();
        denoisers.extend(page.denoisers);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let family = |architecture: &str| {
        architectures
            .iter()
            .find(|a| a.name == architecture)
            .map_or_else(String::new, |a| a.family.clone())
    };
    let active = denoisers
        .into_iter()
        .filter(|d| d.active)
        .map(|info| Active {
            family: family(&info.architecture),
            info,
        })
        .collect();
    Ok((architectures.len(), active))
}

/// One DPM-Solver step for a held-out task of the denoiser's family: the
/// file must arrive whole (size and SHA-256, checked by the client), parse
/// as safetensors with the header's tensors, and hold finite values only.
async fn one_step_sample(channel: &Connection, denoiser: &Active) -> Outcome {
    let family = match Family::parse(&denoiser.family) {
        Ok(Family::Words) | Err(_) => {
            return Outcome::Skipped(format!(
                "family {:?}: no built-in task this command can make without data files",
                denoiser.family
            ));
        }
        Ok(family) => family,
    };
    let denoiser = &denoiser.info;
    let task = family.sample_task(&mut StdRng::seed_from_u64(0), true);
    let file = match TaskFile::of_task(family, &denoiser.architecture, &task) {
        Ok(file) => file,
        Err(e) => return Outcome::Failed(format!("making a {} task: {e}", family.name())),
    };
    let request = pb::GenerateInitRequest {
        task: Some(file.to_proto()),
        options: Some(pb::SamplingOptions {
            num_samples: 1,
            sampler: pb::Sampler::DpmSolver as i32,
            steps: 1,
            seed: Some(0),
            ..Default::default()
        }),
        denoiser_id: denoiser.id.clone(),
    };
    let generated = match client::generate(channel.clone(), request, |_| {}).await {
        Ok(generated) => generated,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let Some(bytes) = generated.files.first() else {
        return Outcome::Failed("the answer held no file".into());
    };
    let tensors = match safetensors::SafeTensors::deserialize(bytes) {
        Ok(tensors) => tensors,
        Err(e) => return Outcome::Failed(format!("the file is not safetensors: {e}")),
    };
    let mut expected: Vec<&str> = generated
        .header
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let mut found: Vec<&str> = tensors.names();
    expected.sort_unstable();
    found.sort_unstable();
    if found != expected {
        return Outcome::Failed(format!("tensors {found:?}, the header lists {expected:?}"));
    }
    let non_finite = tensors
        .tensors()
        .iter()
        .filter(|(_, view)| view.dtype() == safetensors::Dtype::F32)
        .flat_map(|(_, view)| view.data().chunks_exact(4))
        .filter(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
        .count();
    if non_finite > 0 {
        return Outcome::Failed(format!("{non_finite} non-finite values"));
    }
    Outcome::Passed(format!(
        "{} task {}, {} tensors, {} bytes, sampled in {:.0} ms",
        family.name(),
        serde_json::to_string(&task).unwrap_or_default(),
        expected.len(),
        bytes.len(),
        generated.trailer.sampling_ms
    ))
}
