//! The harness's PNG plots, drawn in Rust (plotters): mean learning curves
//! per method, the distribution of steps to target, and novelty histograms
//! against the zoo-to-zoo statistic.

use std::path::Path;

use plotters::prelude::*;

use crate::plot::chart_builder;

/// One colour per series, cycling.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

fn err(e: &dyn std::fmt::Display) -> String {
    e.to_string()
}

fn finite_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (low, high) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if low > high {
        (0.0, 1.0)
    } else if low == high {
        (low - 0.5, high + 0.5)
    } else {
        let pad = (high - low) * 0.05;
        (low - pad, high + pad)
    }
}

/// Lines of `series` (label, value per step) against the step.
pub fn learning_curves(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<f64>)],
) -> Result<(), String> {
    let steps = series
        .iter()
        .map(|(_, v)| v.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let (low, high) = finite_range(series.iter().flat_map(|(_, v)| v.iter().copied()));
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let (mut builder, labelled) = chart_builder(&root, title, 60)?;
    let mut chart = builder
        .build_cartesian_2d(0usize..steps - 1, low..high)
        .map_err(|e| err(&e))?;
    if labelled {
        chart
            .configure_mesh()
            .x_desc("fine-tuning step")
            .y_desc(y_label)
            .draw()
            .map_err(|e| err(&e))?;
    }
    for (i, (label, values)) in series.iter().enumerate() {
        let c = colour(i);
        let points = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(s, v)| (s, *v));
        let drawn = chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if labelled {
            drawn
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        }
    }
    if labelled {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// One row of dots per group (label, values): e.g. steps to target per
/// run, with each group's mean marked.
pub fn strips(
    path: &Path,
    title: &str,
    x_label: &str,
    groups: &[(String, Vec<f64>)],
) -> Result<(), String> {
    let (low, high) = finite_range(groups.iter().flat_map(|(_, v)| v.iter().copied()));
    let rows = groups.len().max(1) as f64;
    let root = BitMapBackend::new(path, (900, 120 + 40 * groups.len() as u32)).into_drawing_area();
    let (mut builder, labelled) = chart_builder(&root, title, 330)?;
    let mut chart = builder
        .build_cartesian_2d(low..high, -0.5..rows - 0.5)
        .map_err(|e| err(&e))?;
    if labelled {
        let names: Vec<String> = groups.iter().map(|(l, _)| l.clone()).collect();
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_labels(groups.len().max(1))
            .y_label_formatter(&move |y: &f64| {
                let i = y.round();
                if (y - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(|e| err(&e))?;
    }
    for (i, (_, values)) in groups.iter().enumerate() {
        let c = colour(i);
        let y = i as f64;
        chart
            .draw_series(
                values
                    .iter()
                    .filter(|v| v.is_finite())
                    .map(|&v| Circle::new((v, y), 4, c.mix(0.6).filled())),
            )
            .map_err(|e| err(&e))?;
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if !finite.is_empty() {
            let mean = finite.iter().sum::<f64>() / finite.len() as f64;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    [(mean, y - 0.35), (mean, y + 0.35)],
                    BLACK.stroke_width(2),
                )))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))
}

/// Overlaid histograms (share of each group per bin) of values in [low, high].
pub fn histograms(
    path: &Path,
    title: &str,
    x_label: &str,
    groups: &[(String, Vec<f64>)],
    bins: usize,
) -> Result<(), String> {
    let (low, high) = finite_range(groups.iter().flat_map(|(_, v)| v.iter().copied()));
    let width = (high - low) / bins.max(1) as f64;
    let shares: Vec<Vec<(f64, f64)>> = groups
        .iter()
        .map(|(_, values)| {
            let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
            let mut counts = vec![0usize; bins.max(1)];
            for v in &finite {
                let b = (((v - low) / width) as usize).min(counts.len() - 1);
                counts[b] += 1;
            }
            counts
                .iter()
                .enumerate()
                .map(|(b, &c)| {
                    (
                        low + (b as f64 + 0.5) * width,
                        c as f64 / finite.len().max(1) as f64,
                    )
                })
                .collect()
        })
        .collect();
    let top = shares
        .iter()
        .flatten()
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(0.05)
        * 1.1;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let (mut builder, labelled) = chart_builder(&root, title, 60)?;
    let mut chart = builder
        .build_cartesian_2d(low..high, 0.0..top)
        .map_err(|e| err(&e))?;
    if labelled {
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("share")
            .draw()
            .map_err(|e| err(&e))?;
    }
    for (i, ((label, _), points)) in groups.iter().zip(&shares).enumerate() {
        let c = colour(i);
        let drawn = chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if labelled {
            drawn
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        }
    }
    if labelled {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        (word(16), word(20))
    }

    #[test]
    fn every_plot_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            ("a".to_owned(), vec![0.1, 0.5, 0.9, f64::NAN]),
            ("b".to_owned(), vec![0.2, 0.3, 0.4, 0.5]),
        ];
        let curves = dir.path().join("curves.png");
        learning_curves(&curves, "t", "accuracy", &series).unwrap();
        assert_eq!(png_size(&curves), (900, 560));
        let strip = dir.path().join("strips.png");
        strips(&strip, "t", "steps", &series).unwrap();
        assert_eq!(png_size(&strip), (900, 200));
        let hist = dir.path().join("hist.png");
        histograms(&hist, "t", "cosine", &series, 10).unwrap();
        assert_eq!(png_size(&hist), (900, 560));
        // Nothing to draw is still a picture, not an error.
        strips(&strip, "t", "steps", &[]).unwrap();
    }
}
