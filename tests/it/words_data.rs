//! The `words` family's data as the bootstrap exports it (wordfreq 3.1.1):
//! every one of the 42 languages reads back against its manifest, holds
//! words of the script it is written in, and splits into training and test
//! words one in five. Needs WEIGHTGEN_WORDS_DIR (scripts/test.sh sources
//! scripts/bootstrap.sh, which sets it); without it the test fails and says
//! so.

use std::collections::BTreeSet;

use weightgen::tasks::words::{Script, WordLists, WordSplit};

#[test]
fn the_exported_lists_hold_42_languages_in_their_scripts_split_one_in_five() {
    let lists = WordLists::from_env().unwrap_or_else(|e| panic!("{e}"));
    let languages = lists.languages();
    assert_eq!(languages.len(), 42, "{languages:?}");
    let expected = [
        ("en", Script::Latin),
        ("fil", Script::Latin),
        ("vi", Script::Latin),
        ("ru", Script::Cyrillic),
        ("mk", Script::Cyrillic),
        ("el", Script::Greek),
        ("he", Script::Hebrew),
        ("ar", Script::Arabic),
        ("fa", Script::Arabic),
        ("ur", Script::Arabic),
        ("hi", Script::Devanagari),
        ("bn", Script::Bengali),
        ("ta", Script::Tamil),
        ("ko", Script::Hangul),
        ("ja", Script::Kana),
        ("zh", Script::Han),
    ];
    let mut scripts = BTreeSet::new();
    for language in &languages {
        let list = lists.load(language).unwrap_or_else(|e| panic!("{e}"));
        let script = list.script();
        scripts.insert(script);
        let test = list.part(WordSplit::Test).count();
        let share = test as f64 / list.words.len() as f64;
        eprintln!(
            "{language}: {} words, {script:?}, {:.1} % test, most frequent {:?}",
            list.words.len(),
            100.0 * share,
            list.words[0].0
        );
        assert!(
            list.words.len() >= 5_000,
            "{language}: {} words",
            list.words.len()
        );
        assert!((0.17..0.23).contains(&share), "{language}: {share} in test");
        if let Some((_, want)) = expected.iter().find(|(l, _)| l == language) {
            assert_eq!(script, *want, "{language}");
        }
    }
    assert!(scripts.len() >= 10, "{scripts:?}");
}

/// Borrowed (word, weight) pairs of owned ones.
fn as_refs(words: &[(String, f64)]) -> Vec<(&str, f64)> {
    words.iter().map(|(w, f)| (w.as_str(), *f)).collect()
}

/// The base model learns the training languages' words, and a rank-4
/// adapter trained on a language the base never saw (Polish: a script it
/// saw) lowers that language's bits per byte on its test words, with the
/// base frozen.
#[test]
fn an_adapter_moves_the_base_model_to_a_language_it_never_saw() {
    use weightgen::tasks::words::lm::{
        Adapter, ByteLm, ByteLmConfig, LmTrainConfig, LoraConfig, bits_per_byte, train,
    };
    tch::set_num_threads(1);
    let lists = WordLists::from_env().unwrap_or_else(|e| panic!("{e}"));
    let part = |language: &str, split: WordSplit| -> Vec<(String, f64)> {
        let list = lists.load(language).unwrap_or_else(|e| panic!("{e}"));
        list.part(split).map(|(w, f)| (w.to_owned(), f)).collect()
    };
    let mut mixture = Vec::new();
    for language in ["en", "de", "es", "ru"] {
        // Each language weighs the same in the mixture.
        let words = part(language, WordSplit::Train);
        let total: f64 = words.iter().map(|(_, f)| f).sum();
        mixture.extend(words.into_iter().map(|(w, f)| (w, f / total)));
    }
    let lm = ByteLm::new(ByteLmConfig::default(), 3, tch::Device::Cpu);
    let polish_train = part("pl", WordSplit::Train);
    let polish_test = part("pl", WordSplit::Test);
    let english_test = part("en", WordSplit::Test);
    let untrained = bits_per_byte(&lm, None, &as_refs(&english_test));
    let config = LmTrainConfig {
        steps: 400,
        batch: 64,
        learning_rate: 3e-3,
        seed: 11,
    };
    train(&lm, None, &as_refs(&mixture), &config);
    let english = bits_per_byte(&lm, None, &as_refs(&english_test));
    let base_on_polish = bits_per_byte(&lm, None, &as_refs(&polish_test));
    let adapter = Adapter::new(&lm, LoraConfig::default(), 5);
    let started = std::time::Instant::now();
    let steps = 200;
    train(
        &lm,
        Some(&adapter),
        &as_refs(&polish_train),
        &LmTrainConfig {
            steps,
            seed: 12,
            ..config
        },
    );
    let per_step = started.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let adapted = bits_per_byte(&lm, Some(&adapter), &as_refs(&polish_test));
    eprintln!(
        "bits/byte: English test words {untrained:.2} untrained → {english:.2} after 400 base steps; \
         Polish test words {base_on_polish:.2} base → {adapted:.2} with a rank-4 adapter after {steps} \
         steps ({per_step:.1} ms per adapter step, debug build, one thread)"
    );
    assert!(english < untrained - 2.0, "{untrained} → {english}");
    assert!(
        adapted < base_on_polish - 0.1,
        "{base_on_polish} → {adapted}"
    );
}

/// A support set's features tell languages apart: ten draws of K = 10
/// English training words sit closer to each other than to Russian or
/// Hebrew ones, and a 50/50 English–German mixture sits between its two
/// languages.
#[test]
fn support_features_tell_languages_and_mixtures_apart() {
    use weightgen::tasks::words::task::{WordsTask, draw_support, word_features};
    let lists = WordLists::from_env().unwrap_or_else(|e| panic!("{e}"));
    let features = |task: &WordsTask, seed: u64| -> Vec<f32> {
        let words = task.words(&lists, WordSplit::Train).unwrap();
        let support = draw_support(&words, 100, seed);
        let refs: Vec<&str> = support.iter().map(String::as_str).collect();
        word_features(&refs)
    };
    let distance =
        |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum() };
    let english = WordsTask::language("en");
    let (en1, en2) = (features(&english, 1), features(&english, 2));
    let russian = features(&WordsTask::language("ru"), 1);
    let hebrew = features(&WordsTask::language("he"), 1);
    let german = features(&WordsTask::language("de"), 1);
    let mixed = features(&WordsTask::mixture("en", "de", 0.5).unwrap(), 1);
    let same = distance(&en1, &en2);
    eprintln!(
        "L1 between byte features: en/en {same:.2}, en/ru {:.2}, en/he {:.2}, en/de {:.2}, mix/en {:.2}, mix/de {:.2}",
        distance(&en1, &russian),
        distance(&en1, &hebrew),
        distance(&en1, &german),
        distance(&mixed, &en1),
        distance(&mixed, &german)
    );
    assert!(distance(&en1, &russian) > 3.0 * same);
    assert!(distance(&en1, &hebrew) > 3.0 * same);
    assert!(distance(&mixed, &en1) < distance(&german, &en1));
    assert!(distance(&mixed, &german) < distance(&german, &en1));
}
