//! What a training run leaves beside its checkpoint: a metrics file (the
//! loss curves and the quality gate's figures) and a PNG plot of the train
//! and validation losses.

use std::collections::BTreeMap;

use plotters::prelude::*;
use serde_json::json;

use crate::plot::chart_builder;

/// The metrics file: curve, summary (final losses, quality gate), run facts.
pub fn metrics_json(
    denoiser_id: &str,
    zoo: &str,
    curve: &[(usize, f64, f64)],
    summary: &BTreeMap<String, f64>,
) -> serde_json::Value {
    json!({
        "denoiser_id": denoiser_id,
        "zoo": zoo,
        "curve": curve
            .iter()
            .map(|&(step, train, val)| json!({"step": step, "train_loss": train, "val_loss": finite_or_null(val)}))
            .collect::<Vec<_>>(),
        "summary": summary.iter().map(|(k, v)| (k.clone(), finite_or_null(*v))).collect::<serde_json::Map<_, _>>(),
    })
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// PNG bytes of the loss curves (log-scale loss against step).
pub fn loss_plot_png(title: &str, curve: &[(usize, f64, f64)]) -> Result<Vec<u8>, String> {
    let path = std::env::temp_dir().join(format!(
        "weightgen-loss-{}-{}.png",
        std::process::id(),
        crate::catalog::now_ms()
    ));
    let drawn = draw(&path, title, curve);
    let bytes = drawn.and_then(|()| std::fs::read(&path).map_err(|e| e.to_string()));
    let _ = std::fs::remove_file(&path);
    bytes
}

fn draw(path: &std::path::Path, title: &str, curve: &[(usize, f64, f64)]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let positive = |x: f64| x.is_finite() && x > 0.0;
    let values: Vec<f64> = curve
        .iter()
        .flat_map(|&(_, a, b)| [a, b])
        .filter(|&x| positive(x))
        .collect();
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(0.0, f64::max);
    let (low, high) = if values.is_empty() {
        (0.01, 1.0)
    } else {
        (low * 0.9, high * 1.1)
    };
    let last_step = curve.last().map_or(1, |c| c.0.max(1));
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    let (mut builder, labelled) = chart_builder(&root, title, 60)?;
    let mut chart = builder
        .build_cartesian_2d(0usize..last_step, (low..high).log_scale())
        .map_err(|e| err(&e))?;
    if labelled {
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(&e))?;
    }
    let series = |pick: fn(&(usize, f64, f64)) -> f64| {
        curve
            .iter()
            .map(move |c| (c.0, pick(c)))
            .filter(move |&(_, y)| positive(y))
    };
    let train = chart
        .draw_series(LineSeries::new(series(|c| c.1), &BLUE))
        .map_err(|e| err(&e))?;
    if labelled {
        train
            .label("train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    }
    let val = chart
        .draw_series(LineSeries::new(series(|c| c.2), &RED))
        .map_err(|e| err(&e))?;
    if labelled {
        val.label("validation (EMA)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_is_a_png_of_the_requested_size() {
        let curve: Vec<(usize, f64, f64)> = (1..=20)
            .map(|i| (i * 10, 1.0 / i as f64, 1.2 / i as f64))
            .collect();
        let png = loss_plot_png("test run", &curve).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((width, height), (800, 500));
        // An empty or non-finite curve still plots (an axis, no lines).
        assert!(loss_plot_png("empty", &[(1, f64::NAN, f64::NAN)]).is_ok());
    }

    #[test]
    fn metrics_keep_the_curve_and_null_non_finite_values() {
        let mut summary = BTreeMap::new();
        summary.insert("final_val_loss".to_owned(), f64::NAN);
        summary.insert("final_train_loss".to_owned(), 0.5);
        let m = metrics_json("d1", "z", &[(10, 0.5, f64::NAN)], &summary);
        assert_eq!(m["curve"][0]["step"], 10);
        assert!(m["curve"][0]["val_loss"].is_null());
        assert_eq!(m["summary"]["final_train_loss"], 0.5);
        assert!(m["summary"]["final_val_loss"].is_null());
    }
}
