//! Named figures — a denoiser's summary — in JSON, which has no NaN or
//! infinity: serde_json writes `null` for them, and a map of f64 does not
//! read back. A figure that could not be measured (a gate score NaN for a
//! family without that row) is left out when written, and a `null` already
//! written reads as absent, so a checkpoint or catalog row stays readable.

use std::collections::BTreeMap;

/// The figures JSON can hold: the finite ones.
pub fn finite(figures: &BTreeMap<String, f64>) -> BTreeMap<&str, f64> {
    figures
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(k, v)| (k.as_str(), *v))
        .collect()
}

/// Figures read back, a `null` as absent.
pub fn present(read: BTreeMap<String, Option<f64>>) -> BTreeMap<String, f64> {
    read.into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmeasured_figures_are_left_out_and_nulls_read_as_absent() {
        let figures = BTreeMap::from([
            ("a".to_owned(), 1.5),
            ("b".to_owned(), f64::NAN),
            ("c".to_owned(), f64::INFINITY),
        ]);
        let text = serde_json::to_string(&finite(&figures)).unwrap();
        assert_eq!(text, r#"{"a":1.5}"#);
        let read: BTreeMap<String, Option<f64>> =
            serde_json::from_str(r#"{"a":1.5,"b":null}"#).unwrap();
        assert_eq!(present(read), BTreeMap::from([("a".to_owned(), 1.5)]));
    }
}
