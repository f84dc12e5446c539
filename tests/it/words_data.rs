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
