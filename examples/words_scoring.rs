//! What scoring an adapter through the `words` base costs — the unit of
//! work of the training gate and of `pca:auto` on a words zoo (issue 20):
//! a task's test words (read from the exported lists, split, mixed) and
//! their bits per byte under the base with an adapter, for ten training
//! languages, on one thread. Prints milliseconds per task for each part
//! and the bits per byte summed over the tasks (to check that a faster
//! path scores the same). Random base and adapter weights: the cost does
//! not depend on them.
//!
//! `cargo run --release --example words_scoring` after sourcing
//! scripts/bootstrap.sh (which exports the word lists).

use std::time::Instant;

use tch::Device;
use weightgen::tasks::TaskSpec;
use weightgen::tasks::words::lm::{Adapter, ByteLm, ByteLmConfig, LoraConfig, bits_per_byte};
use weightgen::tasks::words::{HELD_OUT_LANGUAGES, WordLists, WordSplit};

fn main() {
    tch::set_num_threads(1);
    let lists = WordLists::from_env().unwrap_or_else(|e| panic!("{e}"));
    let lm = ByteLm::new(ByteLmConfig::default(), 1, Device::Cpu);
    let adapter = Adapter::new(&lm, LoraConfig::default(), 2);
    let tasks: Vec<TaskSpec> = lists
        .languages()
        .into_iter()
        .filter(|l| !HELD_OUT_LANGUAGES.contains(l))
        .take(10)
        .map(|language| TaskSpec::Words {
            language: language.to_owned(),
            second: None,
            alpha: 1.0,
        })
        .collect();
    let rounds = 3;
    let (mut reading, mut scoring, mut total, mut words_scored) = (0.0, 0.0, 0.0, 0);
    for _ in 0..rounds {
        total = 0.0;
        for task in &tasks {
            let started = Instant::now();
            let words = task
                .words_task()
                .expect("a words task")
                .words(&lists, WordSplit::Test)
                .unwrap_or_else(|e| panic!("{e}"));
            reading += started.elapsed().as_secs_f64();
            let pairs: Vec<(&str, f64)> = words.iter().map(|(w, f)| (w.as_str(), *f)).collect();
            let started = Instant::now();
            total += bits_per_byte(&lm, Some(&adapter), &pairs);
            scoring += started.elapsed().as_secs_f64();
            words_scored += pairs.len();
        }
    }
    let calls = (rounds * tasks.len()) as f64;
    println!("| part | ms per task |");
    println!("|---|---|");
    println!(
        "| a task's test words (read, split, mixed) | {:.2} |",
        reading / calls * 1e3
    );
    println!(
        "| their bits per byte, base + adapter ({} words a task) | {:.2} |",
        words_scored / (rounds * tasks.len()),
        scoring / calls * 1e3
    );
    println!(
        "bits per byte summed over {} tasks: {total:.6}",
        tasks.len()
    );
}
