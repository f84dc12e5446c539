//! The plotting set-up the training report and the evaluation harness
//! share (plotters, PNG): a label font from the system when there is one,
//! and a chart started in the house style.

use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Fonts tried for the plot's labels, in order; without any of them the
/// plot is drawn without text.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Whether a font for labels could be registered (the system DejaVu fonts).
fn font_available() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        for path in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Fills `root` white and starts a chart on it with a 15-pixel margin and,
/// when a font could be loaded, the `title` and room for axis labels
/// (`y_label_area` pixels left of the plot); returns it and whether
/// labels can be drawn.
pub fn chart_builder<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    y_label_area: u32,
) -> Result<(ChartBuilder<'a, 'b, BitMapBackend<'b>>, bool), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let labelled = font_available();
    let mut builder = ChartBuilder::on(root);
    builder.margin(15);
    if labelled {
        builder
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(y_label_area);
    }
    Ok((builder, labelled))
}
