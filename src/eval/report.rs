//! The harness's report as Markdown, and its place in a results file
//! (between markers, so re-running replaces only its own section).

use std::path::Path;

use super::learner::WORDS_FINETUNE_BATCH;
use super::protocol::{EvalConfig, Method, PROPOSAL_FINETUNE_LR};
use super::stats::MeanCi;
use super::summary::{EvalReport, HypernetworkChoice};
use crate::tasks::Objective;

/// Who produced a report: shown above its tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// Family and zoo.
    pub title: String,
    /// The command line.
    pub command: String,
    /// Commit of the code.
    pub commit: String,
    /// Machine and device.
    pub machine: String,
    /// Denoiser id.
    pub denoiser: String,
}

fn lr(x: f64) -> String {
    format!("{x:e}").replace("e-", "e-")
}

/// Three significant digits ("0.00213", "24.3", "inf").
fn significant(x: f64) -> String {
    if !x.is_finite() || x == 0.0 {
        return format!("{x}");
    }
    let decimals = (2 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.decimals$}")
}

/// " Its encoder was chosen on the validation tasks: …" for the
/// baselines paragraph.
fn hypernetwork_choice_text(choice: &HypernetworkChoice, metric: &str, digits: usize) -> String {
    let variant = |prototypes: bool| {
        if prototypes {
            "with the label-prototype branch"
        } else {
            "without the label-prototype branch"
        }
    };
    let scores: Vec<String> = choice
        .validation
        .iter()
        .map(|(p, score)| format!("{} {score:.digits$}", variant(*p)))
        .collect();
    format!(
        " The hypernetwork's encoder was chosen on the validation tasks by zero-shot {metric}: {} → **{}**.",
        scores.join(", "),
        variant(choice.prototypes)
    )
}

fn steps(m: &MeanCi, reached: f64) -> String {
    format!("{} ({:.0} %)", m.show(1), reached * 100.0)
}

/// Draws the learning curves, steps-to-target and novelty plots of
/// `report` into `dir` as `STEM-curves.png`, `STEM-steps.png` and
/// `STEM-novelty.png`; returns (caption, file name) of each.
pub fn draw_plots(
    report: &EvalReport,
    config: &EvalConfig,
    dir: &Path,
    stem: &str,
) -> Result<Vec<(String, String)>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let label = |m: &Method| m.label(config);
    let lr_text = lr(report.chosen_lr);
    let curves: Vec<(String, Vec<f64>)> = report
        .curves
        .iter()
        .map(|(m, c)| (label(m), c.clone()))
        .collect();
    let steps: Vec<(String, Vec<f64>)> = report
        .steps_runs
        .iter()
        .map(|(m, s)| (label(m), s.clone()))
        .collect();
    let mut novelty: Vec<(String, Vec<f64>)> = vec![(
        "zoo model vs nearest other".to_owned(),
        report.zoo_to_zoo_cosines.clone(),
    )];
    novelty.extend(
        report
            .cosine_runs
            .iter()
            .map(|(m, c)| (label(m), c.clone())),
    );
    let files = [
        (
            format!(
                "mean test {} while fine-tuning at lr {lr_text}",
                report.metric
            ),
            format!("{stem}-curves.png"),
        ),
        (
            format!("steps to target at lr {lr_text}, per run (bar: mean)"),
            format!("{stem}-steps.png"),
        ),
        (
            "cosine to the nearest zoo model (centered weights)".to_owned(),
            format!("{stem}-novelty.png"),
        ),
    ];
    super::plots::learning_curves(&dir.join(&files[0].1), &files[0].0, report.metric, &curves)?;
    super::plots::strips(&dir.join(&files[1].1), &files[1].0, "steps", &steps)?;
    super::plots::histograms(&dir.join(&files[2].1), &files[2].0, "cosine", &novelty, 20)?;
    Ok(files.into_iter().collect())
}

/// The report's Markdown; `plots` are (caption, path relative to the
/// Markdown file) of pictures to link.
pub fn markdown(
    report: &EvalReport,
    config: &EvalConfig,
    who: &Provenance,
    plots: &[(String, String)],
) -> String {
    let metric = report.metric;
    let digits = if report.objective == Objective::Classification {
        3
    } else {
        4
    };
    let mut out = String::new();
    let push = |out: &mut String, line: String| {
        out.push_str(&line);
        out.push('\n');
    };
    push(&mut out, format!("### {}", who.title));
    push(&mut out, String::new());
    push(
        &mut out,
        format!(
            "Command: `{}` · commit {} · seed {} · {} · denoiser `{}` · {} held-out tasks × {} seeds \
             (held out: {}).",
            who.command,
            who.commit,
            config.seed,
            who.machine,
            who.denoiser,
            report.tasks,
            report.seeds,
            report.held_out
        ),
    );
    push(&mut out, String::new());
    let grid: Vec<String> = report
        .lr_scores
        .iter()
        .map(|(l, s)| format!("{}: {s:.digits$}", lr(*l)))
        .collect();
    let (steps_kind, target) = match report.objective {
        Objective::LanguageModel => (
            format!(
                "Adam steps of {WORDS_FINETUNE_BATCH} training words drawn by frequency, the test words' \
                 bits per byte measured every {} steps (a run reaches the target at the first measurement that \
                 does)",
                config.eval_every
            ),
            "Target: 90 % of the gain the fully trained adapter makes over the base model (random init is \
             PEFT's, B = 0: the base itself).",
        ),
        _ => (
            "full-batch Adam steps".to_owned(),
            "Target: 90 % of it (MSE: within 1/0.9).",
        ),
    };
    push(
        &mut out,
        format!(
            "Learning rate for random init, chosen on {} other held-out tasks by test {metric} after {} steps: {} → **{}**. \
             Fully trained (random init, {} {} at {}): {metric} {}. {} Steps are counted up to {}; a run that does not reach the target counts as \
             {} and the share that reached it is in brackets. Speed-up: geometric mean over runs of \
             (random's steps + 1) / (the method's steps + 1). Few-shot: fine-tuned {} steps at the chosen rate on K \
             training examples. Compute: FLOPs of sampling plus fine-tuning to the target at the chosen rate, \
             random init's total ÷ the method's total (dense-layer count: 2 per weight per row and forward, 3 forwards per \
             training step; stored inits cost nothing, meta-training and hypernetwork training are not charged \
             per task).",
            config.validation_tasks,
            config.finetune_steps,
            grid.join(", "),
            lr(report.chosen_lr),
            config.full_steps,
            steps_kind,
            lr(report.chosen_lr),
            report.fully_trained.show(digits),
            target,
            config.finetune_steps,
            config.finetune_steps,
            config.few_shot_steps,
        ),
    );
    push(&mut out, String::new());
    let mut baselines = format!(
        "Baselines: nearest zoo model by standardized descriptor; that model plus Gaussian noise of σ = {} × the zoo's \
         per-weight standard deviation, and plus noise scaled per run so that it sits as far from the zoo as \
         weightgen's DDPM sample for the same run (σ = {} × the zoo's, mean ± 95 % CI); the zoo's mean; Reptile and \
         first-order MAML meta-trained on the zoo's tasks; a hypernetwork (the denoiser's task encoder + a linear head) \
         regressed on the zoo.",
        config.noise_scale,
        report.matched_noise_scale.show(3),
    );
    if let Some(choice) = &report.hypernetwork_choice {
        baselines.push_str(&hypernetwork_choice_text(choice, metric, digits));
    }
    match report.support_only_k {
        Some(k) => baselines.push_str(&format!(
            " The support-only row conditions on the K = {k} few-shot examples of each run alone (no task metadata), \
             the same examples the K = {k} few-shot runs of every method fine-tune on; its convergence runs start from \
             that init too."
        )),
        // Not when `--methods` left the row out: the denoiser may read one.
        None if config
            .only
            .as_ref()
            .is_none_or(|only| only.contains(&Method::WeightgenSupportOnly)) =>
        {
            baselines.push_str(" The denoiser reads no support set, so there is no support-only row.")
        }
        None => {}
    }
    if report.methods.contains_key(&Method::WeightgenFeaturesOnly) {
        baselines.push_str(
            " The features-only row conditions on the task metadata alone (no support set): the request of a \
             client with no examples.",
        );
    }
    if report.methods.contains_key(&Method::WeightgenWrongTask) {
        baselines.push_str(
            " The control row conditions each task on another held-out task's descriptor (features and support \
             set): if it scores near the true descriptor, the condition is not being used.",
        );
    }
    push(&mut out, baselines);
    push(&mut out, String::new());
    let ks: Vec<usize> = config.few_shot.clone();
    let mut header = format!(
        "| method | zero-shot {metric} | steps to target @ {} | speed-up @ {} | steps to target @ {} | speed-up @ {} |",
        lr(PROPOSAL_FINETUNE_LR),
        lr(PROPOSAL_FINETUNE_LR),
        lr(report.chosen_lr),
        lr(report.chosen_lr)
    );
    for k in &ks {
        header.push_str(&format!(" K = {k} |"));
    }
    header.push_str(" compute to target vs random | time per init |");
    push(&mut out, header);
    push(
        &mut out,
        format!(
            "|---|---|---|---|---|---|{}---|---|",
            "---|".repeat(ks.len())
        ),
    );
    for (method, s) in &report.methods {
        let mut row = format!(
            "| {} | {} | {} | {}× | {} | {}× |",
            method.label(config),
            s.zero_shot.show(digits),
            steps(&s.steps_proposal_lr, s.reached_proposal_lr),
            s.speedup_proposal_lr.show(2),
            steps(&s.steps_best_lr, s.reached_best_lr),
            s.speedup_best_lr.show(2),
        );
        for k in &ks {
            let cell = s.few_shot.get(k).map_or("—".into(), |m| m.show(digits));
            row.push_str(&format!(" {cell} |"));
        }
        row.push_str(&format!(
            " {}× | {:.3} s |",
            significant(s.compute_ratio_best_lr),
            s.init_seconds
        ));
        push(&mut out, row);
    }
    push(&mut out, String::new());
    for line in group_table(report, config, digits) {
        push(&mut out, line);
    }
    push(
        &mut out,
        "Novelty (weights centered by the zoo mean, in the zoo's frame; prediction agreement on the task's test inputs):"
            .into(),
    );
    push(&mut out, String::new());
    push(
        &mut out,
        "| inits | cosine to nearest zoo model | L2 to nearest zoo model | agreement with its predictions | mean pairwise cosine |"
            .into(),
    );
    push(&mut out, "|---|---|---|---|---|".into());
    push(
        &mut out,
        format!(
            "| zoo model vs its nearest other zoo model | {} | {} | — | — |",
            report.zoo_to_zoo_cosine.show(3),
            report.zoo_to_zoo_l2.show(2)
        ),
    );
    for (method, s) in &report.methods {
        if let Some(n) = &s.novelty {
            push(
                &mut out,
                format!(
                    "| {} | {} | {} | {} | {:.3} |",
                    method.label(config),
                    n.cosine_to_nearest.show(3),
                    n.l2_to_nearest.show(2),
                    n.agreement_with_nearest.show(3),
                    n.pairwise_cosine
                ),
            );
        }
    }
    push(&mut out, String::new());
    for (caption, file) in plots {
        push(&mut out, format!("![{caption}]({file})"));
    }
    if !plots.is_empty() {
        push(&mut out, String::new());
    }
    for line in verdicts(report, config) {
        push(&mut out, format!("- {line}"));
    }
    out
}

/// The held-out groups side by side (zero-shot and speed-up at the chosen
/// rate per group), followed by a blank line; nothing for a family whose
/// held-out tasks form one group.
fn group_table(report: &EvalReport, config: &EvalConfig, digits: usize) -> Vec<String> {
    if report.groups.is_empty() {
        return Vec::new();
    }
    let names: Vec<&&str> = report.groups.keys().collect();
    let runs = |g: &str| report.groups[g].get(&Method::Random).map_or(0, |s| s.runs);
    let mut header = "| method |".to_owned();
    for g in &names {
        header.push_str(&format!(
            " zero-shot, {g} ({} runs) | speed-up @ {}, {g} |",
            runs(g),
            lr(report.chosen_lr)
        ));
    }
    let mut lines = vec![
        "By held-out group:".to_owned(),
        String::new(),
        header,
        format!("|---|{}", "---|---|".repeat(names.len())),
    ];
    for method in report.methods.keys() {
        let mut row = format!("| {} |", method.label(config));
        for g in &names {
            match report.groups[**g].get(method) {
                Some(s) => row.push_str(&format!(
                    " {} | {}× |",
                    s.zero_shot.show(digits),
                    s.speedup_best_lr.show(2)
                )),
                None => row.push_str(" — | — |"),
            }
        }
        lines.push(row);
    }
    let mut row = format!(
        "| fully trained (random init, {} steps at {}) |",
        config.full_steps,
        lr(report.chosen_lr)
    );
    for g in &names {
        let full = report
            .group_fully_trained
            .get(**g)
            .map_or("—".to_owned(), |m| m.show(digits));
        row.push_str(&format!(" {full} | — |"));
    }
    lines.push(row);
    lines.push(String::new());
    lines
}

/// Plain statements of where the best weightgen row loses to a baseline,
/// how the few-shot rows compare, and whether the condition matters (the
/// wrong-task control).
pub fn verdicts(report: &EvalReport, config: &EvalConfig) -> Vec<String> {
    let higher_is_better = report.objective == Objective::Classification;
    let better = |a: f64, b: f64| if higher_is_better { a > b } else { a < b };
    let generated: Vec<_> = report
        .methods
        .iter()
        .filter(|(m, _)| m.is_generated() && **m != Method::WeightgenWrongTask)
        .collect();
    let Some((best_method, best)) = generated.iter().copied().reduce(|a, b| {
        if better(b.1.zero_shot.mean, a.1.zero_shot.mean) {
            b
        } else {
            a
        }
    }) else {
        return Vec::new();
    };
    let label = best_method.label(config);
    let mut out = Vec::new();
    for (method, s) in report.methods.iter().filter(|(m, _)| !m.is_generated()) {
        if better(s.zero_shot.mean, best.zero_shot.mean) {
            out.push(format!(
                "weightgen loses zero-shot: {} scores {} against {} for {label} ({:+.3}).",
                method.label(config),
                s.zero_shot.show(3),
                best.zero_shot.show(3),
                best.zero_shot.mean - s.zero_shot.mean
            ));
        }
        if *method != Method::Random && s.speedup_best_lr.mean > best.speedup_best_lr.mean {
            out.push(format!(
                "weightgen converges slower at the chosen rate than {}: speed-up {}× against {}× for {label}.",
                method.label(config),
                s.speedup_best_lr.show(2),
                best.speedup_best_lr.show(2)
            ));
        }
    }
    // The control: does the right descriptor matter?
    if let Some(wrong) = report.methods.get(&Method::WeightgenWrongTask) {
        let right = &best.zero_shot;
        let apart = if better(right.mean, wrong.zero_shot.mean) {
            if right.separated_from(&wrong.zero_shot) {
                "the condition matters: the intervals are apart"
            } else {
                "the intervals overlap: the condition barely matters"
            }
        } else {
            "the wrong descriptor does as well: the condition is not used"
        };
        out.push(format!(
            "Control: another task's descriptor scores {} zero-shot against {} for {label}; {apart}.",
            wrong.zero_shot.show(3),
            right.show(3),
        ));
    }
    // The fair few-shot comparison: support set only against meta-learning.
    if let Some(support_only) = report.methods.get(&Method::WeightgenSupportOnly) {
        for meta in [Method::Reptile, Method::Fomaml] {
            let Some(m) = report.methods.get(&meta) else {
                continue;
            };
            for (k, mine) in &support_only.few_shot {
                let Some(theirs) = m.few_shot.get(k) else {
                    continue;
                };
                let verb = if better(mine.mean, theirs.mean) {
                    "beats"
                } else {
                    "loses to"
                };
                out.push(format!(
                    "Few-shot K = {k}, same information: {} {verb} {} ({} against {}, {:+.3}).",
                    Method::WeightgenSupportOnly.label(config),
                    meta.label(config),
                    mine.show(3),
                    theirs.show(3),
                    mine.mean - theirs.mean
                ));
            }
        }
    }
    if best.speedup_best_lr.mean < 1.0 {
        out.push(format!(
            "At the chosen learning rate {label} needs more steps than random init (speed-up {}×).",
            best.speedup_best_lr.show(2)
        ));
    }
    if let Some(n) = &best.novelty
        && n.cosine_to_nearest.mean > report.zoo_to_zoo_cosine.mean
    {
        out.push(format!(
            "{label}'s inits sit closer to their nearest zoo model (cosine {}) than zoo models sit to each other ({}): \
             closer to retrieval than the zoo's own spread.",
            n.cosine_to_nearest.show(3),
            report.zoo_to_zoo_cosine.show(3)
        ));
    }
    if out.is_empty() {
        out.push(format!(
            "{label} beats every baseline here on zero-shot {} and convergence speed.",
            report.metric
        ));
    }
    out
}

/// Replaces (or appends) the section `key` of the Markdown file `path` with
/// `text`, between `<!-- eval:KEY:begin -->` and `<!-- eval:KEY:end -->`.
pub fn write_section(path: &Path, key: &str, text: &str) -> std::io::Result<()> {
    let begin = format!("<!-- eval:{key}:begin -->");
    let end = format!("<!-- eval:{key}:end -->");
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{begin}\n{text}{end}\n");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            let after = old[b + end.len()..]
                .strip_prefix('\n')
                .unwrap_or(&old[b + end.len()..]);
            format!("{}{block}{after}", &old[..a])
        }
        _ if old.is_empty() => block,
        _ => format!("{}\n{block}", old.trim_end_matches('\n').to_owned() + "\n"),
    };
    std::fs::write(path, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_keep_three_significant_digits() {
        assert_eq!(significant(0.002134), "0.00213");
        assert_eq!(significant(24.28), "24.3");
        assert_eq!(significant(1.0), "1.00");
        assert_eq!(significant(f64::INFINITY), "inf");
    }

    #[test]
    fn sections_are_replaced_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("RESULTS.md");
        std::fs::write(&path, "# Results\n\nintro\n").unwrap();
        write_section(&path, "digits", "first\n").unwrap();
        write_section(&path, "sinusoid", "sine\n").unwrap();
        write_section(&path, "digits", "second\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Results\n\nintro\n"));
        assert!(text.contains("<!-- eval:digits:begin -->\nsecond\n<!-- eval:digits:end -->"));
        assert!(!text.contains("first"));
        assert!(text.contains("sine\n"));
        assert!(text.find("second").unwrap() < text.find("sine").unwrap());
    }
}
