//! The `words` family's tasks and what a user can give about one: a task
//! is a language or a mixture of two with weight α (a continuum of tasks);
//! its words are the languages' words by frequency, scaled by their
//! weights; a support set is K training words drawn by frequency (the
//! "prompts", as in Drag-and-Drop LLMs), and its features are the bytes'
//! frequencies and the mean length — what a client can compute from the
//! examples it sends.

use std::collections::BTreeMap;

use super::lm::MAX_WORD_BYTES;
use super::{HELD_OUT_LANGUAGES, WeightedDraws, WordLists, WordSplit, WordsError};

/// Features of a support set: 256 byte frequencies and the mean length.
pub const FEATURE_DIM: usize = 257;

/// Why a task is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WordsTaskError {
    /// α outside (0, 1), or not finite.
    #[error("alpha: {0} must lie strictly between 0 and 1")]
    Alpha(f64),
    /// A mixture of a language with itself.
    #[error("languages: a mixture needs two different languages, got {0:?} twice")]
    SameLanguage(String),
}

/// A language, or two mixed.
#[derive(Debug, Clone, PartialEq)]
pub struct WordsTask {
    /// (language, weight), weights summing to 1.
    pub parts: Vec<(String, f64)>,
}

impl WordsTask {
    /// One language.
    pub fn language(language: &str) -> Self {
        Self {
            parts: vec![(language.to_owned(), 1.0)],
        }
    }

    /// `first` with weight α and `second` with 1 − α.
    pub fn mixture(first: &str, second: &str, alpha: f64) -> Result<Self, WordsTaskError> {
        if !(alpha.is_finite() && alpha > 0.0 && alpha < 1.0) {
            return Err(WordsTaskError::Alpha(alpha));
        }
        if first == second {
            return Err(WordsTaskError::SameLanguage(first.to_owned()));
        }
        Ok(Self {
            parts: vec![(first.to_owned(), alpha), (second.to_owned(), 1.0 - alpha)],
        })
    }

    /// Whether any of its languages is held out from the zoo.
    pub fn is_held_out(&self) -> bool {
        self.parts
            .iter()
            .any(|(l, _)| HELD_OUT_LANGUAGES.contains(&l.as_str()))
    }

    /// Its words of one part with their weights (each language's
    /// frequencies normalized to its weight; a word of both languages gets
    /// both shares), the model's readable words only, most weight first.
    pub fn words(
        &self,
        lists: &WordLists,
        split: WordSplit,
    ) -> Result<Vec<(String, f64)>, WordsError> {
        let mut weights: BTreeMap<String, f64> = BTreeMap::new();
        for (language, share) in &self.parts {
            let list = lists.load(language)?;
            let words: Vec<(&str, f64)> = list
                .part(split)
                .filter(|(w, _)| w.len() <= MAX_WORD_BYTES)
                .collect();
            let total: f64 = words.iter().map(|(_, f)| f).sum();
            for (word, frequency) in words {
                *weights.entry(word.to_owned()).or_default() += share * frequency / total;
            }
        }
        let mut words: Vec<(String, f64)> = weights.into_iter().collect();
        words.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(words)
    }
}

/// K words drawn by weight (with replacement) from `words`, the draw a
/// function of `seed` alone.
pub fn draw_support(words: &[(String, f64)], k: usize, seed: u64) -> Vec<String> {
    WeightedDraws::new(words.iter().map(|(_, w)| *w))
        .draw(k, seed, 0)
        .into_iter()
        .map(|i| words[i].0.clone())
        .collect()
}

/// The features of a support set: each byte value's share of all bytes
/// (256), then the mean length in bytes over [`MAX_WORD_BYTES`]. Zeros for
/// an empty set.
pub fn word_features(words: &[&str]) -> Vec<f32> {
    let mut features = vec![0f32; FEATURE_DIM];
    let bytes: usize = words.iter().map(|w| w.len()).sum();
    if bytes == 0 {
        return features;
    }
    for word in words {
        for &b in word.as_bytes() {
            features[usize::from(b)] += 1.0;
        }
    }
    for f in &mut features[..256] {
        *f /= bytes as f32;
    }
    features[256] = bytes as f32 / words.len() as f32 / MAX_WORD_BYTES as f32;
    features
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixtures_need_two_languages_and_an_alpha_inside_zero_one() {
        let task = WordsTask::mixture("en", "de", 0.25).unwrap();
        assert_eq!(task.parts, vec![("en".into(), 0.25), ("de".into(), 0.75)]);
        assert!(!task.is_held_out());
        assert!(WordsTask::mixture("en", "he", 0.5).unwrap().is_held_out());
        for alpha in [0.0, 1.0, -0.5, f64::NAN] {
            let refused = WordsTask::mixture("en", "de", alpha).unwrap_err();
            assert!(refused.to_string().starts_with("alpha:"), "{refused}");
        }
        assert_eq!(
            WordsTask::mixture("en", "en", 0.5).unwrap_err(),
            WordsTaskError::SameLanguage("en".into())
        );
    }

    #[test]
    fn features_are_byte_shares_and_mean_length() {
        let f = word_features(&["ab", "b"]);
        assert_eq!(f.len(), FEATURE_DIM);
        assert!((f[usize::from(b'a')] - 1.0 / 3.0).abs() < 1e-6);
        assert!((f[usize::from(b'b')] - 2.0 / 3.0).abs() < 1e-6);
        assert!((f[256] - 1.5 / MAX_WORD_BYTES as f32).abs() < 1e-6);
        assert!(word_features(&[]).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn support_draws_follow_the_weights_and_the_seed() {
        let words = vec![("common".to_owned(), 0.9), ("rare".to_owned(), 0.1)];
        let draw = draw_support(&words, 1_000, 7);
        assert_eq!(draw, draw_support(&words, 1_000, 7));
        assert_ne!(draw, draw_support(&words, 1_000, 8));
        let common = draw.iter().filter(|w| *w == "common").count();
        assert!((850..950).contains(&common), "{common}");
        assert!(draw_support(&[], 3, 1).is_empty());
    }
}
