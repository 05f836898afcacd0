//! `OUTPUT/final/training_curves.png`: loss, reward margins, reward accuracies and α / learning
//! rate over updates, drawn from the metrics records (train and `eval/`).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use serde_json::Value;

/// DejaVu Sans (Bitstream Vera license, assets/DejaVuSans-LICENSE.txt): text needs a font and a
/// machine may have none.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

type Series = (String, Vec<(f64, f64)>);

fn series(history: &[Value], key: &str) -> Vec<(f64, f64)> {
    history
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    lines: &[Series],
) -> Result<()> {
    let pts = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("update")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, p)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Draw the four panels into `path` (PNG).
pub fn plot_history(history: &[Value], path: &Path) -> Result<()> {
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((2, 2));
    let named = |pairs: &[(&str, &str)]| -> Vec<Series> {
        pairs
            .iter()
            .map(|(label, key)| (label.to_string(), series(history, key)))
            .filter(|(_, p)| !p.is_empty())
            .collect()
    };
    panel(
        &areas[0],
        "loss",
        &named(&[("train", "loss"), ("eval", "eval/loss")]),
    )?;
    panel(
        &areas[1],
        "reward margin (β·m)",
        &named(&[
            ("train", "rewards/margins"),
            ("eval", "eval/rewards/margins"),
        ]),
    )?;
    panel(
        &areas[2],
        "reward accuracy",
        &named(&[
            ("weighted", "rewards/accuracies"),
            ("source", "rewards/source_accuracies"),
            ("pivot (target)", "rewards/pivot_accuracies"),
            ("eval weighted", "eval/rewards/accuracies"),
        ]),
    )?;
    let lr = series(history, "learning_rate");
    let peak = lr.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let mut sched = named(&[("α", "cur_alpha")]);
    if peak > 0.0 {
        sched.push((
            format!("lr / {peak:.1e}"),
            lr.iter().map(|&(x, y)| (x, y / peak)).collect(),
        ));
    }
    panel(&areas[3], "α and learning rate", &sched)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
