//! Ablations: several denoisers that differ in one design choice (T, the
//! schedule, the network, the conditioning, the latent, alignment, E, the
//! zoo size),
//! each evaluated by the harness on the same held-out tasks against the
//! same random inits, as one table with a row per denoiser.

use serde_json::Value;

use super::protocol::{EvalConfig, Method};
use super::report::Provenance;
use super::summary::EvalReport;
use crate::diffusion::schedule::ScheduleKind;
use crate::model::{DenoiserConfig, NetConfig, TokenLayout};
use crate::tasks::train::Objective;

/// The method an ablation row reports: the guided DDIM sample, the
/// proposal's fast sampler.
pub const ABLATION_METHOD: Method = Method::WeightgenDdimGuided;

/// The other request forms an ablation can add, each as a zero-shot
/// column (`eval --ablation … --methods …`): what the main row scores with
/// both inputs, a user sending the features alone or the support set alone
/// may not get, and the wrong task's descriptor says whether the condition
/// steers at all.
pub const ABLATION_FORMS: [Method; 3] = [
    Method::WeightgenFeaturesOnly,
    Method::WeightgenSupportOnly,
    Method::WeightgenWrongTask,
];

/// The methods an ablation evaluates: its main row and the `forms` asked
/// for (each one of [`ABLATION_FORMS`], or the method is returned as the
/// error).
pub fn ablation_methods(forms: &[Method]) -> Result<Vec<Method>, Method> {
    let mut methods = vec![ABLATION_METHOD];
    for &form in forms {
        if !ABLATION_FORMS.contains(&form) {
            return Err(form);
        }
        if !methods.contains(&form) {
            methods.push(form);
        }
    }
    Ok(methods)
}

/// One evaluated denoiser.
#[derive(Debug, Clone)]
pub struct AblationRow {
    /// Its id.
    pub denoiser: String,
    /// Its design choices, in the table's column order.
    pub variant: Variant,
    /// What the harness measured.
    pub report: EvalReport,
}

/// The design choices an ablation varies.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Diffusion steps T.
    pub timesteps: usize,
    /// "cosine" or "linear".
    pub schedule: &'static str,
    /// The network and, for the MLP U-Net, its conditioning.
    pub network: String,
    /// The space diffused in as trained ("pca:auto", "ae:64", "none", …).
    pub latent: String,
    /// Embedding size E.
    pub embed_dim: i64,
    /// Alignment as trained ("auto", "always", "never").
    pub align: String,
    /// Zoo models it was trained on (train + validation).
    pub zoo_models: usize,
    /// Share of rows trained without descriptor features.
    pub feature_dropout: f64,
}

impl Variant {
    /// The choices of a denoiser from its model config and its catalog
    /// row's config (`zoo_load`, `fit`) and summary (`zoo_models`).
    pub fn of(model: &DenoiserConfig, record_config: &Value, zoo_models: f64) -> Self {
        let network = match &model.net {
            NetConfig::MlpUnet(c) => format!(
                "MLP U-Net {:?}, {}",
                c.widths,
                serde_json::to_value(c.conditioning)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
            NetConfig::LayerTransformer(c) => match c.tokens {
                TokenLayout::Chunks => format!("layer transformer d{} h{}", c.depth, c.hidden),
                TokenLayout::Units => {
                    format!("unit transformer d{} h{} (equivariant)", c.depth, c.hidden)
                }
            },
        };
        Self {
            timesteps: model.timesteps,
            schedule: match model.schedule {
                ScheduleKind::Cosine { .. } => "cosine",
                ScheduleKind::Linear { .. } => "linear",
            },
            network,
            latent: record_config["latent"]
                .as_str()
                .unwrap_or("pca:auto")
                .to_owned(),
            embed_dim: model.encoder.embed_dim,
            align: record_config["zoo_load"]["align"]
                .as_str()
                .unwrap_or("auto")
                .to_owned(),
            zoo_models: zoo_models as usize,
            feature_dropout: record_config["fit"]["feature_dropout"]
                .as_f64()
                .unwrap_or(0.0),
        }
    }
}

/// The ablation table in Markdown.
pub fn ablation_markdown(rows: &[AblationRow], config: &EvalConfig, who: &Provenance) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let metric = first.report.metric;
    let digits = if first.report.objective == Objective::Classification {
        3
    } else {
        4
    };
    let k = config.few_shot.iter().copied().min();
    let forms: Vec<Method> = ABLATION_FORMS
        .into_iter()
        .filter(|m| config.only.as_ref().is_some_and(|only| only.contains(m)))
        .collect();
    let form_columns: String = forms
        .iter()
        .map(|m| format!(" zero-shot, {} |", form_label(*m)))
        .collect();
    let mut out = vec![
        format!("### Ablations: {}", who.title),
        String::new(),
        format!(
            "Command: `{}` · commit {} · seed {} · {} · {} held-out tasks × {} seeds, the same tasks, seeds and \
             random inits for every row. Each row is one denoiser, sampled with {} and fine-tuned at the \
             learning rate chosen for random init ({}); \"speed-up\" is over random init on the same runs. \
             Cosines are to the nearest model of the zoo as the harness loads it (aligned unless built from one \
             shared init), next to the zoo's own nearest-neighbour cosine.{}",
            who.command,
            who.commit,
            config.seed,
            who.machine,
            first.report.tasks,
            first.report.seeds,
            ABLATION_METHOD.label(config),
            first.report.chosen_lr,
            if forms.is_empty() {
                ""
            } else {
                " The request-form columns sample the same denoiser from that input alone (— where it \
                 takes no such input, or no support set beside the features)."
            }
        ),
        String::new(),
        format!(
            "| denoiser | T | schedule | network | latent | E | alignment | zoo models | feature dropout | zero-shot {metric} |{form_columns} \
             random init zero-shot | speed-up | K = {} | cosine to nearest zoo model (zoo-to-zoo) |",
            k.map_or("—".into(), |k| k.to_string())
        ),
        format!(
            "|---|---|---|---|---|---|---|---|---|---|{}---|---|---|---|",
            "---|".repeat(forms.len())
        ),
    ];
    for row in rows {
        let Some(s) = row.report.methods.get(&ABLATION_METHOD) else {
            continue;
        };
        let random = row.report.methods.get(&Method::Random);
        let v = &row.variant;
        let few = k
            .and_then(|k| s.few_shot.get(&k))
            .map_or("—".into(), |m| m.show(digits));
        let cosine = s.novelty.as_ref().map_or("—".into(), |n| {
            format!(
                "{} ({})",
                n.cosine_to_nearest.show(3),
                row.report.zoo_to_zoo_cosine.show(3)
            )
        });
        let form_cells: String = forms
            .iter()
            .map(|m| {
                let cell = row
                    .report
                    .methods
                    .get(m)
                    .map_or("—".into(), |f| f.zero_shot.show(digits));
                format!(" {cell} |")
            })
            .collect();
        out.push(format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} |{form_cells} {} | {}× | {} | {} |",
            row.denoiser,
            v.timesteps,
            v.schedule,
            v.network,
            v.latent,
            v.embed_dim,
            v.align,
            v.zoo_models,
            v.feature_dropout,
            s.zero_shot.show(digits),
            random.map_or("—".into(), |r| r.zero_shot.show(digits)),
            s.speedup_best_lr.show(2),
            few,
            cosine
        ));
    }
    out.push(String::new());
    out.join("\n")
}

/// A form's column heading.
fn form_label(method: Method) -> &'static str {
    match method {
        Method::WeightgenFeaturesOnly => "features only",
        Method::WeightgenSupportOnly => "support set only",
        Method::WeightgenWrongTask => "another task's descriptor",
        _ => "both inputs",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Conditioning, MlpUnetConfig, TaskEncoderConfig};

    #[test]
    fn an_ablation_takes_the_other_request_forms_only() {
        assert_eq!(ablation_methods(&[]), Ok(vec![ABLATION_METHOD]));
        assert_eq!(
            ablation_methods(&[Method::WeightgenWrongTask, Method::WeightgenFeaturesOnly]),
            Ok(vec![
                ABLATION_METHOD,
                Method::WeightgenWrongTask,
                Method::WeightgenFeaturesOnly
            ])
        );
        assert_eq!(
            ablation_methods(&[Method::Hypernetwork]),
            Err(Method::Hypernetwork)
        );
    }

    #[test]
    fn a_variant_reads_the_model_and_the_catalog_row() {
        let mut model = DenoiserConfig::new(
            10,
            TaskEncoderConfig {
                feature_dim: 2,
                support_x_dim: 0,
                support_y_dim: 0,
                hidden: 8,
                embed_dim: 16,
                prototypes: false,
            },
        );
        model.net = NetConfig::MlpUnet(MlpUnetConfig {
            conditioning: Conditioning::Concat,
            ..Default::default()
        });
        model.schedule = ScheduleKind::linear();
        model.timesteps = 100;
        let row = serde_json::json!({
            "zoo_load": {"align": "never", "max_models": 250},
            "fit": {"feature_dropout": 0.5},
            "latent": "ae:64"
        });
        let v = Variant::of(&model, &row, 250.0);
        assert_eq!(v.timesteps, 100);
        assert_eq!(v.schedule, "linear");
        assert_eq!(v.network, "MLP U-Net [512, 256], concat");
        assert_eq!((v.embed_dim, v.zoo_models), (16, 250));
        assert_eq!(v.align, "never");
        assert_eq!(v.feature_dropout, 0.5);
        assert_eq!(v.latent, "ae:64");
        // An older row without the fields reads as the defaults.
        let v = Variant::of(&model, &serde_json::json!({}), 1000.0);
        assert_eq!((v.align.as_str(), v.feature_dropout), ("auto", 0.0));
        assert_eq!(v.latent, "pca:auto");
    }
}
