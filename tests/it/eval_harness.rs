//! `weightgen-worker eval --quick` end to end on a small digits zoo and
//! denoiser trained by the worker: every method's row, the learning-rate
//! choice, few-shot columns, novelty against the zoo, and the report's
//! section written into (and replaced in) a Markdown file; then the
//! ablation table of two denoisers on the same tasks. It checks the
//! harness, not the figures of a real evaluation.

use crate::common::generation::{small_digits_zoo, train, train_with, worker, worker_refused};

/// The numbers in the cells of a Markdown row (the "±" halves included).
fn numbers(row: &str) -> Vec<f64> {
    row.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .filter_map(|t| t.parse::<f64>().ok())
        .collect()
}

#[test]
#[ignore = "slow (65 s here): trains baselines and fine-tunes; scripts/test.sh runs it"]
fn the_quick_profile_writes_every_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    small_digits_zoo(&data);
    train(&data, "digits-eval", "5");
    let results = dir.path().join("RESULTS.md");
    std::fs::write(&results, "# Results\n\nkept\n").unwrap();
    let data_dir = data.to_str().unwrap();
    let args = [
        "eval",
        "--zoo",
        "digits",
        "--quick",
        "--data-dir",
        data_dir,
        "--output",
        results.to_str().unwrap(),
    ];
    let printed = worker(&data, &args);
    let file = std::fs::read_to_string(&results).unwrap();
    assert!(file.starts_with("# Results\n\nkept\n"), "{file}");
    assert!(file.contains("<!-- eval:digits:digits:begin -->"), "{file}");
    assert!(file.contains("denoiser `digits-eval`"), "{file}");
    assert!(file.contains("3 held-out tasks × 1 seeds"), "{file}");
    assert!(
        printed.contains("| method | zero-shot accuracy |"),
        "{printed}"
    );

    let row = |label: &str| -> Vec<f64> {
        let line = file
            .lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .unwrap_or_else(|| panic!("no row {label:?} in\n{file}"));
        numbers(line.trim_start_matches(&format!("| {label} |")))
    };
    for label in [
        "weightgen DDIM-50",
        "weightgen DDIM-50, guidance 3",
        "weightgen DDPM-1000",
        "weightgen DDPM-1000, guidance 3",
        "weightgen DDIM-50, guidance 3, support set only",
        "weightgen DDIM-50, guidance 3, features only",
        "control: weightgen DDIM-50, guidance 3, another task's descriptor",
        "random init (PyTorch default)",
        "nearest zoo model (by descriptor)",
        "nearest zoo model + noise",
        "nearest zoo model + noise as far as weightgen's sample",
        "average of the zoo",
        "Reptile (meta-learned on the zoo tasks)",
        "first-order MAML (meta-learned on the zoo tasks)",
        "hypernetwork (task → weights regression)",
    ] {
        // zero-shot ±, steps ± (reached %), speed-up ± at two rates, K = 10 ±, K = 100 ±.
        let n = row(label);
        // … then the compute ratio and seconds per init.
        assert_eq!(n.len(), 18, "{label}: {n:?}");
        assert!(n[16] > 0.0 && n[17] >= 0.0, "{label}: {n:?}");
        assert!((0.0..=1.0).contains(&n[0]), "{label}: zero-shot {}", n[0]);
        for steps in [n[2], n[7]] {
            assert!((0.0..=40.0).contains(&steps), "{label}: steps {steps}");
        }
        for k in [n[12], n[14]] {
            assert!((0.0..=1.0).contains(&k), "{label}: few-shot {k}");
        }
    }
    // Random init is its own yardstick: speed-up exactly 1, near chance
    // before fine-tuning.
    let random = row("random init (PyTorch default)");
    assert!(random[0] < 0.5, "random zero-shot {}", random[0]);
    assert_eq!((random[5], random[10]), (1.0, 1.0));
    // Novelty: the noised nearest model sits almost on a zoo model; cosines
    // are cosines.
    let noise = row("nearest zoo model + noise");
    let novelty = file
        .lines()
        .filter(|l| l.starts_with("| nearest zoo model + noise |"))
        .nth(1)
        .expect("a novelty row for the noised baseline");
    let cosine = numbers(novelty.trim_start_matches("| nearest zoo model + noise |"))[0];
    assert!(cosine > 0.9, "{novelty}");
    assert!(noise[0] >= 0.0);
    // The matched noise puts the nearest model as far from the zoo as
    // weightgen's DDPM samples are (the cosine it was solved for).
    let novelty_cosine = |label: &str| {
        let line = file
            .lines()
            .filter(|l| l.starts_with(&format!("| {label} |")))
            .nth(1)
            .unwrap_or_else(|| panic!("no novelty row {label:?} in\n{file}"));
        numbers(line.trim_start_matches(&format!("| {label} |")))[0]
    };
    let generated = novelty_cosine("weightgen DDPM-1000, guidance 3");
    let matched = novelty_cosine("nearest zoo model + noise as far as weightgen's sample");
    assert!(
        (matched - generated).abs() < 0.1 && matched < 0.9,
        "matched noise cosine {matched} vs weightgen {generated}"
    );
    assert!(
        file.contains("support-only row conditions on the K = 10"),
        "{file}"
    );
    // Every request form is a row, and the control says whether the
    // condition matters.
    assert!(
        file.contains("The features-only row conditions on the task metadata alone"),
        "{file}"
    );
    assert!(
        file.contains("- Control: another task's descriptor scores"),
        "{file}"
    );
    // The hypernetwork's encoder is chosen on the validation tasks: both
    // variants scored, the better one named.
    let choice = file
        .lines()
        .find_map(|l| {
            l.split_once("The hypernetwork's encoder was chosen on the validation tasks by zero-shot accuracy: ")
                .map(|(_, rest)| rest)
        })
        .unwrap_or_else(|| panic!("no hypernetwork choice in\n{file}"));
    let (with, without) = (
        numbers(
            choice
                .split_once("with the label-prototype branch ")
                .unwrap()
                .1,
        )[0],
        numbers(
            choice
                .split_once("without the label-prototype branch ")
                .unwrap()
                .1,
        )[0],
    );
    let chosen = if with >= without { "with" } else { "without" };
    assert!(
        choice.contains(&format!("→ **{chosen} the label-prototype branch**")),
        "{choice}"
    );
    // The hypernetwork is deterministic given the task: it has a novelty row.
    assert!(
        file.lines()
            .filter(|l| l.starts_with("| hypernetwork (task → weights regression) |"))
            .count()
            == 2,
        "{file}"
    );
    let zoo = file
        .lines()
        .find(|l| l.starts_with("| zoo model vs its nearest other zoo model |"))
        .expect("the zoo-to-zoo row");
    let zoo_cosine =
        numbers(zoo.trim_start_matches("| zoo model vs its nearest other zoo model |"))[0];
    assert!((-1.0..=1.0).contains(&zoo_cosine), "{zoo}");

    // The plots sit beside the results file and are linked from it.
    for plot in ["curves", "steps", "novelty"] {
        let name = format!("eval/digits-digits-{plot}.png");
        assert!(file.contains(&format!("]({name})")), "{file}");
        let png = std::fs::read(dir.path().join(&name)).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    // Ablation mode: a second denoiser with T = 100, both through the same
    // tasks in one table. Random init is measured once and shared, and
    // sharing changes no figure: the `digits-eval` row repeats the main
    // table's guided DDIM row, and random init's column its random row.
    train_with(&data, "digits-t100", "5", &["--timesteps", "100"]);
    let ablation = [
        "eval",
        "--zoo",
        "digits",
        "--quick",
        "--ablation",
        "digits-eval,digits-t100",
        "--data-dir",
        data_dir,
        "--output",
        results.to_str().unwrap(),
    ];
    // Other request forms as columns: only those.
    let text = worker_refused(
        &data,
        &[&ablation[..], &["--methods", "hypernetwork"]].concat(),
    );
    assert!(
        text.contains("takes the other request forms only") && text.contains("not hypernetwork"),
        "{text}"
    );
    let forms = ["--methods", "weightgen-wrong-task,weightgen-features-only"];
    worker(&data, &[&ablation[..], &forms[..]].concat());
    let file = std::fs::read_to_string(&results).unwrap();
    assert_eq!(
        file.matches("<!-- eval:digits:digits:ablation:begin -->")
            .count(),
        1,
        "{file}"
    );
    assert_eq!(file.matches("<!-- eval:digits:digits:begin -->").count(), 1);
    let cells = |id: &str| -> Vec<String> {
        let line = file
            .lines()
            .find(|l| l.starts_with(&format!("| `{id}` |")))
            .unwrap_or_else(|| panic!("no ablation row {id:?} in\n{file}"));
        line.split('|').map(|c| c.trim().to_owned()).collect()
    };
    // Cells: "", denoiser, T, schedule, network, latent, E, alignment, zoo
    // models, feature dropout, zero-shot, its features only, its wrong task
    // (the forms in the table's order), random zero-shot, speed-up, K = 10,
    // cosine. The forms are the main report's rows on the same tasks.
    let (mut base, mut t100) = (cells("digits-eval"), cells("digits-t100"));
    let features_only = row("weightgen DDIM-50, guidance 3, features only");
    let wrong_task = row("control: weightgen DDIM-50, guidance 3, another task's descriptor");
    let (base_forms, t100_forms): (Vec<String>, Vec<String>) =
        (base.drain(11..13).collect(), t100.drain(11..13).collect());
    assert!(
        (numbers(&base_forms[0])[0] - features_only[0]).abs() < 1e-9,
        "{base_forms:?} vs {features_only:?}"
    );
    assert!(
        (numbers(&base_forms[1])[0] - wrong_task[0]).abs() < 1e-9,
        "{base_forms:?} vs {wrong_task:?}"
    );
    assert!(numbers(&t100_forms[0])[0] > 0.0, "{t100_forms:?}");
    assert!(
        file.contains("zero-shot, features only | zero-shot, another task's descriptor |"),
        "{file}"
    );
    assert_eq!((base[2].as_str(), t100[2].as_str()), ("1000", "100"));
    assert_eq!(base[3], "cosine");
    assert!(base[4].starts_with("MLP U-Net [64, 32]"), "{base:?}");
    assert!(base[5].starts_with("pca:") || base[5] == "none", "{base:?}");
    let first = |cell: &str| numbers(cell)[0];
    let guided = row("weightgen DDIM-50, guidance 3");
    let random = row("random init (PyTorch default)");
    assert!(
        (first(&base[10]) - guided[0]).abs() < 1e-9,
        "{base:?} vs {guided:?}"
    );
    assert!(
        (first(&base[12]) - guided[10]).abs() < 1e-9,
        "{base:?} vs {guided:?}"
    );
    assert!(
        (first(&base[13]) - guided[12]).abs() < 1e-9,
        "{base:?} vs {guided:?}"
    );
    assert_eq!(base[11], t100[11], "one random init for every row");
    assert!(
        (first(&base[11]) - random[0]).abs() < 1e-9,
        "{base:?} vs {random:?}"
    );
    for row in [&base, &t100] {
        let cosine = numbers(&row[14]);
        assert!((-1.0..=1.0).contains(&cosine[0]), "{row:?}");
        assert!(first(&row[12]) > 0.0, "{row:?}");
    }

    // A second run replaces its section instead of appending another.
    let again = ["--seed", "1"];
    worker(&data, &[&args[..], &again[..]].concat());
    let file = std::fs::read_to_string(&results).unwrap();
    assert_eq!(file.matches("<!-- eval:digits:digits:begin -->").count(), 1);
    assert!(file.contains("seed 1"), "{file}");

    // `--methods`: only the rows asked for (and random init, the
    // yardstick), with the figures the whole report gives them.
    // A row's figures but its last, the time per init.
    let row_of = |text: &str, label: &str| -> Option<Vec<f64>> {
        text.lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .map(|l| {
                let mut figures = numbers(l.trim_start_matches(&format!("| {label} |")));
                figures.pop();
                figures
            })
    };
    let some = [
        "eval",
        "--zoo",
        "digits",
        "--quick",
        "--seed",
        "1",
        "--methods",
        "weightgen-features-only,nearest-zoo",
        "--data-dir",
        data_dir,
    ];
    let printed = worker(&data, &some);
    // The support-only row was not asked for; the denoiser does read one.
    assert!(!printed.contains("reads no support set"), "{printed}");
    for label in [
        "weightgen DDIM-50, guidance 3, features only",
        "nearest zoo model (by descriptor)",
        "random init (PyTorch default)",
    ] {
        assert_eq!(
            row_of(&printed, label),
            row_of(&file, label),
            "{label}:\n{printed}"
        );
    }
    for label in [
        "weightgen DDIM-50, guidance 3",
        "hypernetwork (task → weights regression)",
        "Reptile (meta-learned on the zoo tasks)",
    ] {
        assert_eq!(row_of(&printed, label), None, "{label}:\n{printed}");
    }

    // `--sampler one-step`: the same tasks and yardstick, weightgen's row
    // sampled by one x̂₀ step and labelled so.
    let one_step = [
        "eval",
        "--zoo",
        "digits",
        "--quick",
        "--seed",
        "1",
        "--methods",
        "weightgen-features-only",
        "--sampler",
        "one-step",
        "--guidance",
        "1",
        "--data-dir",
        data_dir,
    ];
    let printed = worker(&data, &one_step);
    let row = row_of(&printed, "weightgen one-step x̂₀, guidance 1, features only")
        .unwrap_or_else(|| panic!("the one-step row:\n{printed}"));
    assert!(row[0] > 0.0 && row[0] <= 1.0, "{row:?}");
    assert_eq!(
        row_of(&printed, "random init (PyTorch default)"),
        row_of(&file, "random init (PyTorch default)")
    );
    assert_eq!(
        row_of(&printed, "weightgen DDIM-50, guidance 3, features only"),
        None
    );
}
