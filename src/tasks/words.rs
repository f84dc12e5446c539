//! The word lists of the `words` family (issue 20): the most frequent words
//! of 42 languages from PyPI `wordfreq==3.1.1` (data CC BY-SA 4.0),
//! exported once by `scripts/bootstrap.sh` to `WEIGHTGEN_WORDS_DIR`
//! (`<lang>.tsv`: `word<TAB>frequency`, most frequent first, and a
//! `MANIFEST` of the languages with each file's word count and SHA-256).
//! Nothing is downloaded here. Every word falls in the training or the test
//! part of its language by a stable hash of its bytes, the same on every
//! machine and for every run; each list is checked against the manifest
//! when read.

pub mod lm;
pub mod task;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::blobs::sha256_hex;
use crate::rng::splitmix64;

/// The environment variable naming the exported lists' directory.
pub const WORDS_DIR_ENV: &str = "WEIGHTGEN_WORDS_DIR";
/// The wordfreq version the lists come from.
pub const WORDFREQ_VERSION: &str = "3.1.1";
/// One word in this many goes to its language's test part.
pub const TEST_ONE_IN: u64 = 5;
/// The 42 languages whose lists wordfreq [`WORDFREQ_VERSION`] ships (its
/// `available_languages(wordlist="best")`), the codes tasks name.
pub const WORDFREQ_LANGUAGES: [&str; 42] = [
    "ar", "bg", "bn", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr", "he",
    "hi", "hu", "id", "is", "it", "ja", "ko", "lt", "lv", "mk", "ms", "nb", "nl", "pl", "pt", "ro",
    "ru", "sh", "sk", "sl", "sv", "ta", "tr", "uk", "ur", "vi", "zh",
];

/// Languages no zoo task and no base-model training contains, fixed before
/// any result: two in scripts the zoo sees (Polish: Latin; Ukrainian:
/// Cyrillic) and two in scripts no other language uses (Hebrew, Tamil).
pub const HELD_OUT_LANGUAGES: [&str; 4] = ["pl", "uk", "he", "ta"];

/// The held-out languages whose script no zoo language (and no word the
/// base model trained on) is written in.
pub const UNSEEN_SCRIPT_LANGUAGES: [&str; 2] = ["he", "ta"];

/// Why the word lists cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WordsError {
    /// No directory was given and the environment names none.
    #[error(
        "no word lists: {WORDS_DIR_ENV} is not set (source scripts/bootstrap.sh, which exports \
         wordfreq=={WORDFREQ_VERSION}'s lists once)"
    )]
    NoDirectory,
    /// A file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file is not what the exporter writes.
    #[error("{path}:{line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The language is not in the manifest.
    #[error("unknown language {language:?}; the lists hold {known}")]
    UnknownLanguage {
        /// What was asked.
        language: String,
        /// The languages there are, comma-separated.
        known: String,
    },
    /// A list no longer matches the manifest.
    #[error(
        "{path}: {reason} (re-export it: remove the directory and source scripts/bootstrap.sh)"
    )]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
}

/// A uniform in [0, 1) from a 64-bit hash (its top 53 bits).
pub fn unit_interval(key: u64) -> f64 {
    (key >> 11) as f64 / (1u64 << 53) as f64
}

/// Draws with replacement by weight: draw number c (counted from a
/// caller's first number) takes the first index whose running sum of
/// weights passes a uniform from SplitMix64(seed ^ SplitMix64(c)), so a
/// draw is a function of (seed, c) alone.
#[derive(Debug, Clone)]
pub struct WeightedDraws {
    cumulative: Vec<f64>,
}

impl WeightedDraws {
    /// Draws over `weights` (index i weighs weights[i]).
    pub fn new(weights: impl IntoIterator<Item = f64>) -> Self {
        let mut total = 0.0;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                total += w;
                total
            })
            .collect();
        Self { cumulative }
    }

    /// `count` indices, draws numbered first, first + 1, …; none when there
    /// is nothing to draw.
    pub fn draw(&self, count: usize, seed: u64, first: u64) -> Vec<usize> {
        let Some(&total) = self.cumulative.last() else {
            return Vec::new();
        };
        let last = self.cumulative.len() - 1;
        (0..count as u64)
            .map(|i| {
                let u = unit_interval(splitmix64(seed ^ splitmix64(first + i))) * total;
                self.cumulative.partition_point(|&c| c <= u).min(last)
            })
            .collect()
    }
}

/// Which part of its language a word belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WordSplit {
    /// Words the zoo's adapters and the base model train on.
    Train,
    /// Words the metric is measured on.
    Test,
}

/// The part `word` belongs to: SplitMix64 of its bytes' FNV-1a hash, one
/// in [`TEST_ONE_IN`] to the test part.
pub fn split_of(word: &str) -> WordSplit {
    let hash = crate::rng::fnv1a(crate::rng::FNV_OFFSET, word.as_bytes());
    if splitmix64(hash).is_multiple_of(TEST_ONE_IN) {
        WordSplit::Test
    } else {
        WordSplit::Train
    }
}

/// The writing system most of a language's letters are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Script {
    /// Latin letters (with diacritics).
    Latin,
    /// Cyrillic.
    Cyrillic,
    /// Greek.
    Greek,
    /// Arabic (also Persian and Urdu).
    Arabic,
    /// Hebrew.
    Hebrew,
    /// Devanagari (Hindi).
    Devanagari,
    /// Bengali.
    Bengali,
    /// Tamil.
    Tamil,
    /// Hangul (Korean).
    Hangul,
    /// Hiragana and katakana.
    Kana,
    /// CJK ideographs.
    Han,
    /// Thai.
    Thai,
    /// Anything else (digits, punctuation and other scripts are not counted).
    Other,
}

/// The script of one character; None for characters that belong to no
/// script (digits, punctuation, marks, spaces).
pub fn script_of(c: char) -> Option<Script> {
    let script = match u32::from(c) {
        0x41..=0x5A | 0x61..=0x7A | 0xC0..=0x24F | 0x1E00..=0x1EFF => Script::Latin,
        0x400..=0x52F => Script::Cyrillic,
        0x370..=0x3FF | 0x1F00..=0x1FFF => Script::Greek,
        0x591..=0x5F4 => Script::Hebrew,
        0x600..=0x6FF | 0x750..=0x77F | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => Script::Arabic,
        0x900..=0x97F => Script::Devanagari,
        0x980..=0x9FF => Script::Bengali,
        0xB80..=0xBFF => Script::Tamil,
        0xE00..=0xE7F => Script::Thai,
        0x1100..=0x11FF | 0x3130..=0x318F | 0xAC00..=0xD7AF => Script::Hangul,
        0x3040..=0x30FF => Script::Kana,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF => Script::Han,
        _ if c.is_alphabetic() => Script::Other,
        _ => return None,
    };
    Some(script)
}

/// One language's exported words.
#[derive(Debug, Clone, PartialEq)]
pub struct WordList {
    /// The wordfreq language code, e.g. "en", "zh", "fil".
    pub language: String,
    /// (word, frequency), most frequent first.
    pub words: Vec<(String, f64)>,
}

impl WordList {
    /// The words of one part, with their frequencies.
    pub fn part(&self, split: WordSplit) -> impl Iterator<Item = (&str, f64)> {
        self.words
            .iter()
            .filter(move |(w, _)| split_of(w) == split)
            .map(|(w, f)| (w.as_str(), *f))
    }

    /// The script most of the list's letters are in, weighted by frequency.
    pub fn script(&self) -> Script {
        let mut weight: BTreeMap<Script, f64> = BTreeMap::new();
        for (word, frequency) in &self.words {
            for script in word.chars().filter_map(script_of) {
                *weight.entry(script).or_default() += frequency;
            }
        }
        weight
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(Script::Other, |(s, _)| s)
    }
}

/// The exported lists: their directory and manifest.
#[derive(Debug, Clone)]
pub struct WordLists {
    dir: PathBuf,
    /// language → (words, SHA-256 of its file).
    manifest: BTreeMap<String, (usize, String)>,
}

impl WordLists {
    /// The lists in `WEIGHTGEN_WORDS_DIR`.
    pub fn from_env() -> Result<Self, WordsError> {
        let dir = std::env::var_os(WORDS_DIR_ENV).ok_or(WordsError::NoDirectory)?;
        Self::open(Path::new(&dir))
    }

    /// The lists in `dir` (reads the manifest only).
    pub fn open(dir: &Path) -> Result<Self, WordsError> {
        let path = dir.join("MANIFEST");
        let text = read(&path)?;
        let mut manifest = BTreeMap::new();
        let mut version = None;
        for (i, line) in text.lines().enumerate() {
            let bad = |reason: String| WordsError::Malformed {
                path: path.clone(),
                line: i + 1,
                reason,
            };
            let fields: Vec<&str> = line.split('\t').collect();
            match fields.as_slice() {
                ["wordfreq", v] => version = Some((*v).to_owned()),
                ["top_n", _] => {}
                ["language", lang, count, sha] => {
                    let count = count
                        .parse()
                        .map_err(|_| bad(format!("word count {count:?} is not a number")))?;
                    manifest.insert((*lang).to_owned(), (count, (*sha).to_owned()));
                }
                _ => return Err(bad(format!("unexpected line {line:?}"))),
            }
        }
        match version.as_deref() {
            Some(WORDFREQ_VERSION) => {}
            other => {
                return Err(WordsError::Mismatch {
                    path,
                    reason: format!("exported from wordfreq {other:?}, not {WORDFREQ_VERSION}"),
                });
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// The language codes, sorted.
    pub fn languages(&self) -> Vec<&str> {
        self.manifest.keys().map(String::as_str).collect()
    }

    /// One language's list, checked against the manifest.
    pub fn load(&self, language: &str) -> Result<WordList, WordsError> {
        let Some((count, sha)) = self.manifest.get(language) else {
            return Err(WordsError::UnknownLanguage {
                language: language.chars().take(64).collect(),
                known: self.languages().join(", "),
            });
        };
        let path = self.dir.join(format!("{language}.tsv"));
        let text = read(&path)?;
        let digest = sha256_hex(text.as_bytes());
        if &digest != sha {
            return Err(WordsError::Mismatch {
                path,
                reason: format!("SHA-256 {digest}, the manifest says {sha}"),
            });
        }
        let words = parse(&path, &text)?;
        if words.len() != *count {
            return Err(WordsError::Mismatch {
                path,
                reason: format!("{} words, the manifest says {count}", words.len()),
            });
        }
        Ok(WordList {
            language: language.to_owned(),
            words,
        })
    }
}

fn read(path: &Path) -> Result<String, WordsError> {
    std::fs::read_to_string(path).map_err(|source| WordsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// `word<TAB>frequency` lines: non-empty words, finite positive
/// frequencies that never increase.
fn parse(path: &Path, text: &str) -> Result<Vec<(String, f64)>, WordsError> {
    let mut words = Vec::new();
    let mut last = f64::INFINITY;
    for (i, line) in text.lines().enumerate() {
        let bad = |reason: String| WordsError::Malformed {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let (word, frequency) = line
            .split_once('\t')
            .ok_or_else(|| bad("no tab between word and frequency".into()))?;
        let frequency: f64 = frequency
            .parse()
            .map_err(|_| bad(format!("frequency {frequency:?} is not a number")))?;
        if word.is_empty() || !(frequency.is_finite() && frequency > 0.0) || frequency > last {
            return Err(bad(format!(
                "word {word:?} with frequency {frequency}: words must be non-empty, frequencies \
                 positive and never increasing"
            )));
        }
        last = frequency;
        words.push((word.to_owned(), frequency));
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_stable_and_one_in_five() {
        // Fixed words, fixed parts: the hash must never change.
        let parts: Vec<WordSplit> = ["the", "und", "мир", "的", "x"]
            .iter()
            .map(|w| split_of(w))
            .collect();
        let again: Vec<WordSplit> = ["the", "und", "мир", "的", "x"]
            .iter()
            .map(|w| split_of(w))
            .collect();
        assert_eq!(parts, again);
        let test = (0..20_000)
            .filter(|i| split_of(&format!("w{i}")) == WordSplit::Test)
            .count();
        assert!((3_700..4_300).contains(&test), "{test} of 20,000 in test");
    }

    #[test]
    fn scripts_are_read_from_letters() {
        let list = |words: &[&str]| WordList {
            language: "xx".into(),
            words: words.iter().map(|w| ((*w).to_owned(), 1.0)).collect(),
        };
        assert_eq!(list(&["hello", "naïve", "1234"]).script(), Script::Latin);
        assert_eq!(list(&["мир", "да"]).script(), Script::Cyrillic);
        assert_eq!(list(&["שלום"]).script(), Script::Hebrew);
        assert_eq!(list(&["سلام"]).script(), Script::Arabic);
        assert_eq!(list(&["नमस्ते"]).script(), Script::Devanagari);
        assert_eq!(list(&["안녕"]).script(), Script::Hangul);
        assert_eq!(list(&["的", "是"]).script(), Script::Han);
        assert_eq!(script_of('7'), None);
    }

    #[test]
    fn lists_are_checked_against_the_manifest_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = "the\t5.0e-02\nof\t3.0e-02\n";
        let sha = sha256_hex(text.as_bytes());
        std::fs::write(dir.path().join("en.tsv"), text).unwrap();
        let manifest = format!("wordfreq\t3.1.1\ntop_n\t2\nlanguage\ten\t2\t{sha}\n");
        std::fs::write(dir.path().join("MANIFEST"), manifest).unwrap();
        let lists = WordLists::open(dir.path()).unwrap();
        assert_eq!(lists.languages(), vec!["en"]);
        let en = lists.load("en").unwrap();
        assert_eq!(en.words[1], ("of".to_owned(), 0.03));
        let unknown = lists.load("qq").unwrap_err().to_string();
        assert!(
            unknown.contains("unknown language \"qq\"") && unknown.contains("en"),
            "{unknown}"
        );
        // A changed file is refused by its digest.
        std::fs::write(dir.path().join("en.tsv"), "the\t5.0e-02\n").unwrap();
        let changed = lists.load("en").unwrap_err().to_string();
        assert!(changed.contains("SHA-256"), "{changed}");
        // Malformed lines are named by file and line.
        let bad = parse(Path::new("en.tsv"), "the\t0.5\nof\t0.9\n")
            .unwrap_err()
            .to_string();
        assert!(bad.starts_with("en.tsv:2:"), "{bad}");
        let bad = parse(Path::new("en.tsv"), "the 0.5\n")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("no tab"), "{bad}");
        // Another wordfreq version is refused.
        std::fs::write(dir.path().join("MANIFEST"), "wordfreq\t3.0.0\n").unwrap();
        let version = WordLists::open(dir.path()).unwrap_err().to_string();
        assert!(version.contains("not 3.1.1"), "{version}");
    }
}
