//! Sizing the `words` family (issue 20): how fast a base model learns the
//! training languages, and what a zoo adapter costs — time per LoRA step
//! and bits per byte after S steps on one training language's test words,
//! against the base and a long-trained adapter — for two base sizes, on
//! this machine's threads. Prints a Markdown table (docs/BENCHMARKS.md).
//!
//! `cargo run --release --example words_sizing` after sourcing
//! scripts/bootstrap.sh (which exports the word lists).

use std::time::Instant;

use tch::Device;
use weightgen::tasks::words::lm::{
    Adapter, ByteLm, ByteLmConfig, LmTrainConfig, LoraConfig, bits_per_byte, train,
};
use weightgen::tasks::words::{HELD_OUT_LANGUAGES, WordLists, WordSplit};

fn main() {
    tch::set_num_threads(2);
    let lists = WordLists::from_env().unwrap_or_else(|e| panic!("{e}"));
    let part = |language: &str, split: WordSplit| -> Vec<(String, f64)> {
        let list = lists.load(language).unwrap_or_else(|e| panic!("{e}"));
        list.part(split).map(|(w, f)| (w.to_owned(), f)).collect()
    };
    let mut mixture: Vec<(String, f64)> = Vec::new();
    for language in lists.languages() {
        if HELD_OUT_LANGUAGES.contains(&language) {
            continue;
        }
        let words = part(language, WordSplit::Train);
        let total: f64 = words.iter().map(|(_, f)| f).sum();
        mixture.extend(words.into_iter().map(|(w, f)| (w, f / total)));
    }
    let mixture_words = mixture;
    let mixture: Vec<(&str, f64)> = mixture_words
        .iter()
        .map(|(w, f)| (w.as_str(), *f))
        .collect();
    // A training language as the zoo task of the sizing.
    let (train_words, test_words) = (part("fi", WordSplit::Train), part("fi", WordSplit::Test));
    let task_train: Vec<(&str, f64)> = train_words.iter().map(|(w, f)| (w.as_str(), *f)).collect();
    let task_test: Vec<(&str, f64)> = test_words.iter().map(|(w, f)| (w.as_str(), *f)).collect();
    println!(
        "| base | parameters | base steps | base time | Finnish test bits/byte: base | adapter steps | ms per adapter step (64 words) | adapter | adapters per minute |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (config, base_steps) in [
        (ByteLmConfig::default(), 3000),
        (
            ByteLmConfig {
                width: 128,
                layers: 4,
                heads: 4,
            },
            3000,
        ),
    ] {
        let lm = ByteLm::new(config, 1, Device::Cpu);
        let parameters: i64 = lm
            .vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        let started = Instant::now();
        train(
            &lm,
            None,
            &mixture,
            &LmTrainConfig {
                steps: base_steps,
                batch: 64,
                learning_rate: 3e-3,
                seed: 1,
            },
        );
        let base_seconds = started.elapsed().as_secs_f64();
        let base = bits_per_byte(&lm, None, &task_test);
        for steps in [100usize, 200, 400, 1600] {
            let adapter = Adapter::new(&lm, LoraConfig::default(), 2);
            let started = Instant::now();
            train(
                &lm,
                Some(&adapter),
                &task_train,
                &LmTrainConfig {
                    steps,
                    batch: 64,
                    learning_rate: 3e-3,
                    seed: 3,
                },
            );
            let seconds = started.elapsed().as_secs_f64();
            let adapted = bits_per_byte(&lm, Some(&adapter), &task_test);
            println!(
                "| width {} × {} blocks | {parameters} | {base_steps} | {base_seconds:.0} s | {base:.3} | {steps} | {:.1} | {adapted:.3} | {:.0} |",
                config.width,
                config.layers,
                seconds * 1e3 / steps as f64,
                60.0 / seconds
            );
        }
    }
}
