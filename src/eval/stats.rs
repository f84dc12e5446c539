//! Means with 95 % confidence intervals over tasks and seeds.

/// z for a two-sided 95 % interval (normal approximation).
pub const Z_95: f64 = 1.96;

/// A mean and the half-width of its 95 % confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanCi {
    /// The sample mean.
    pub mean: f64,
    /// Half-width: the interval is mean ± this.
    pub half_width: f64,
    /// Values it summarizes (NaNs excluded).
    pub n: usize,
}

impl MeanCi {
    /// Mean ± 1.96 · s/√n of the finite `values` (half-width 0 for one value,
    /// NaN for none).
    pub fn of(values: &[f64]) -> Self {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let n = finite.len();
        if n == 0 {
            return Self {
                mean: f64::NAN,
                half_width: f64::NAN,
                n,
            };
        }
        let mean = finite.iter().sum::<f64>() / n as f64;
        let half_width = if n < 2 {
            0.0
        } else {
            let var = finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            Z_95 * (var / n as f64).sqrt()
        };
        Self {
            mean,
            half_width,
            n,
        }
    }

    /// The geometric mean of positive `ratios` with its interval, computed
    /// on their logarithms.
    pub fn geometric(ratios: &[f64]) -> Self {
        let logs: Vec<f64> = ratios
            .iter()
            .filter(|r| r.is_finite() && **r > 0.0)
            .map(|r| r.ln())
            .collect();
        let log = Self::of(&logs);
        let mean = log.mean.exp();
        Self {
            mean,
            // The interval is asymmetric; report the larger side.
            half_width: (log.mean + log.half_width).exp() - mean,
            n: log.n,
        }
    }

    /// Whether the two 95 % intervals do not overlap.
    pub fn separated_from(&self, other: &Self) -> bool {
        (self.mean - other.mean).abs() > self.half_width + other.half_width
    }

    /// "0.748 ± 0.031", with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        if self.mean.is_nan() {
            return "—".into();
        }
        format!(
            "{:.digits$} ± {:.digits$}",
            self.mean,
            self.half_width,
            digits = digits
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_follow_the_spread_and_skip_nans() {
        let m = MeanCi::of(&[1.0, 2.0, 3.0, f64::NAN]);
        assert_eq!(m.n, 3);
        assert!((m.mean - 2.0).abs() < 1e-12);
        // s = 1, n = 3: 1.96 / √3.
        assert!((m.half_width - 1.96 / 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(MeanCi::of(&[4.0]).half_width, 0.0);
        assert!(MeanCi::of(&[]).mean.is_nan());
        assert_eq!(MeanCi::of(&[0.5, 0.5]).show(2), "0.50 ± 0.00");
        let g = MeanCi::geometric(&[2.0, 8.0]);
        assert!((g.mean - 4.0).abs() < 1e-12);
        assert!(g.half_width > 0.0);
        assert!(MeanCi::of(&[1.0, 1.1]).separated_from(&MeanCi::of(&[3.0, 3.1])));
        assert!(!MeanCi::of(&[1.0, 3.0]).separated_from(&MeanCi::of(&[2.0, 2.5])));
    }
}
