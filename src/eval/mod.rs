//! Measuring inits: fine-tuning curves and steps to a target, the
//! evaluation harness against baselines (`weightgen-worker eval`), novelty
//! against the zoo, confidence intervals, and the Markdown report.

pub mod ablation;
pub mod baselines;
pub mod finetune;
pub mod harness;
mod inits;
pub mod learner;
pub mod novelty;
pub mod plots;
pub mod protocol;
pub mod report;
pub mod stats;
pub mod subject;
pub mod summary;

pub use ablation::{
    ABLATION_FORMS, ABLATION_METHOD, AblationRow, Variant, ablation_markdown, ablation_methods,
};
pub use finetune::{
    DEFAULT_TARGET_FRACTION, FinetuneConfig, InitFileError, curve, params_from_safetensors,
    steps_to_target, target_of,
};
pub use harness::{Yardstick, evaluate, evaluate_with};
pub use protocol::{EvalConfig, EvalSampler, Method};
pub use report::{Provenance, draw_plots, markdown, write_section};
pub use stats::MeanCi;
pub use subject::{Subject, SubjectError, load_denoiser, load_subject, load_zoo};
pub use summary::EvalReport;
