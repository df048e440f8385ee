//! Charts of the [`crate::eval`] values: ROC curves, faithfulness curves, scatter plots.

use super::svg::{legend, legend_size, num, palette, Axis, Frame, Svg};
use crate::eval::{Correlation, FaithfulnessCurve, Roc};

/// ROC curves of several methods on one square chart, the chance diagonal dashed, and a legend
/// giving each method's trapezoid AUC and ACDC's pessimistic AUC.
pub fn roc_svg(curves: &[(String, Roc)]) -> String {
    let (w, h) = (620.0, 560.0);
    let frame = Frame {
        left: 80.0,
        top: 50.0,
        width: 440.0,
        height: 440.0,
        x: Axis::linear(0.0, 1.0),
        y: Axis::linear(0.0, 1.0),
    };
    let mut svg = Svg::new(w, h);
    frame.draw_axes(
        &mut svg,
        "ROC against the ground-truth circuit",
        "false-positive rate (edges)",
        "true-positive rate (edges)",
    );
    let (x0, y0) = frame.pt(0.0, 0.0);
    let (x1, y1) = frame.pt(1.0, 1.0);
    svg.line(x0, y0, x1, y1, r##"stroke="#999" stroke-dasharray="4 4""##);
    let mut entries = Vec::new();
    for (i, (name, roc)) in curves.iter().enumerate() {
        let colour = palette(i);
        let pts: Vec<(f64, f64)> = roc.points.iter().map(|&(x, y)| frame.pt(x, y)).collect();
        svg.polyline(
            &pts,
            &format!(
                r#"stroke="{colour}" stroke-width="2.2" stroke-linejoin="round" class="curve""#
            ),
        );
        entries.push((
            colour.to_string(),
            format!(
                "{name}: AUC {} (pessimistic {})",
                fmt3(roc.auc_trapezoid),
                fmt3(roc.auc_staircase)
            ),
            false,
        ));
    }
    if curves.is_empty() {
        no_data(&mut svg, &frame);
    }
    // Lower right: the one corner a ROC curve worth plotting stays away from.
    let (lw, lh) = legend_size(&entries);
    let lx = (frame.left + frame.width - lw - 8.0).max(frame.left + 4.0);
    legend(&mut svg, lx, frame.top + frame.height - lh - 8.0, &entries);
    svg.finish()
}

/// Faithfulness against the fraction of edges kept, one curve per method, with the `f = 1`
/// line (the full model) and `f = 0` (the empty circuit). The x axis is log10 when every
/// fraction is positive and they span more than a decade (MIB's 0.1 % … 100 %), else linear.
/// MIB's two faithfulness curves of a scores file: edges selected by signed score (its area
/// is the CPR) and by |score| (the CMD is its area from 1).
pub fn mib_svg(score: &crate::eval::MibScore) -> String {
    faithfulness_svg(&[
        ("signed (CPR)".to_string(), score.signed.curve.clone()),
        ("|score| (CMD)".to_string(), score.absolute.curve.clone()),
    ])
}

pub fn faithfulness_svg(curves: &[(String, FaithfulnessCurve)]) -> String {
    let (w, h) = (700.0, 470.0 + 18.0 * curves.len() as f64);
    let xs = || curves.iter().flat_map(|(_, c)| c.fractions.iter().copied());
    let positive = xs().all(|x| x > 0.0 && x.is_finite());
    let (xmin, xmax) = xs().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let x_axis = if positive && xmin.is_finite() && xmax / xmin > 10.0 {
        Axis::log(xmin, xmax)
    } else {
        Axis::linear(0.0, 1.0)
    };
    let ys = curves
        .iter()
        .flat_map(|(_, c)| c.faithfulness.iter().copied())
        .chain([0.0, 1.0]);
    let frame = Frame {
        left: 80.0,
        top: 50.0,
        width: 560.0,
        height: 340.0,
        x: x_axis,
        y: Axis::linear_over(ys),
    };
    let mut svg = Svg::new(w, h);
    let x_label = if x_axis.log {
        "fraction of edges kept (log scale)"
    } else {
        "fraction of edges kept"
    };
    frame.draw_axes(
        &mut svg,
        "Faithfulness of the top-k circuits",
        x_label,
        "faithfulness",
    );
    let (l, r) = (frame.left, frame.left + frame.width);
    // Curves usually start near 0 on the left and end near 1 on the right, so each reference
    // line is labelled at the end the curves are far from.
    let y1 = frame.py(1.0);
    svg.line(l, y1, r, y1, r##"stroke="#444" stroke-dasharray="6 3""##);
    svg.text(l + 6.0, y1 - 6.0, "full model (f = 1)", r##"fill="#444""##);
    let y0 = frame.py(0.0);
    svg.line(l, y0, r, y0, r##"stroke="#999" stroke-dasharray="2 3""##);
    svg.text(
        r - 6.0,
        y0 - 6.0,
        "empty circuit (f = 0)",
        r##"text-anchor="end" fill="#777""##,
    );

    let mut entries = Vec::new();
    for (i, (name, curve)) in curves.iter().enumerate() {
        let colour = palette(i);
        let pts: Vec<(f64, f64)> = curve
            .fractions
            .iter()
            .zip(&curve.faithfulness)
            .map(|(&x, &f)| frame.pt(x, f))
            .collect();
        svg.polyline(
            &pts,
            &format!(r#"stroke="{colour}" stroke-width="2.2" class="curve""#),
        );
        for &(x, y) in &pts {
            svg.circle(x, y, 3.0, &format!(r#"fill="{colour}""#));
        }
        entries.push((
            colour.to_string(),
            format!("{name}: CPR {}, CMD {}", fmt3(curve.cpr), fmt3(curve.cmd)),
            false,
        ));
    }
    if curves.is_empty() {
        no_data(&mut svg, &frame);
    }
    // Below the chart: the curves may cross any corner of the frame.
    legend(
        &mut svg,
        frame.left,
        frame.top + frame.height + 56.0,
        &entries,
    );
    svg.finish()
}

/// A scatter plot of `points` with the `y = x` line and, when given, the correlation figures.
/// Both axes share one range, so agreement with `y = x` can be read off directly.
pub fn scatter_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
    correlation: Option<&Correlation>,
) -> String {
    let (w, h) = (560.0, 560.0);
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let axis = Axis::linear_over(finite.iter().flat_map(|&(x, y)| [x, y]));
    let frame = Frame {
        left: 80.0,
        top: 50.0,
        width: 440.0,
        height: 440.0,
        x: axis,
        y: axis,
    };
    let mut svg = Svg::new(w, h);
    frame.draw_axes(&mut svg, title, x_label, y_label);
    let (ax, ay) = frame.pt(axis.lo, axis.lo);
    let (bx, by) = frame.pt(axis.hi, axis.hi);
    svg.line(ax, ay, bx, by, r##"stroke="#999" stroke-dasharray="5 4""##);
    svg.text(
        bx - 6.0,
        by + 16.0,
        "y = x",
        r##"text-anchor="end" fill="#777""##,
    );
    if axis.lo < 0.0 && axis.hi > 0.0 {
        let (zx, zy) = (frame.px(0.0), frame.py(0.0));
        let (l, t) = (frame.left, frame.top);
        svg.line(zx, t, zx, t + frame.height, r##"stroke="#bbb""##);
        svg.line(l, zy, l + frame.width, zy, r##"stroke="#bbb""##);
    }
    // Many points overlap: small translucent dots show the density.
    let r = if finite.len() > 2000 { 1.8 } else { 3.0 };
    svg.raw(r##"<g fill="#1f77b4" fill-opacity="0.55" stroke="none" class="points">"##);
    for &(x, y) in &finite {
        let (px, py) = frame.pt(x, y);
        svg.raw(&format!(
            r#"<circle cx="{}" cy="{}" r="{r}"/>"#,
            num(px),
            num(py)
        ));
    }
    svg.raw("</g>");
    if finite.is_empty() {
        no_data(&mut svg, &frame);
    }
    if let Some(c) = correlation {
        let lines = [
            format!("n = {}", c.n),
            format!("Pearson r = {}", fmt3(c.pearson)),
            format!("R² = {}", fmt3(c.r2)),
            format!("Spearman ρ = {}", fmt3(c.spearman)),
        ];
        let (x, y) = (frame.left + 10.0, frame.top + 10.0);
        svg.rect(
            x,
            y,
            150.0,
            78.0,
            r##"fill="white" fill-opacity="0.9" stroke="#999" rx="3""##,
        );
        for (i, line) in lines.iter().enumerate() {
            svg.text(x + 8.0, y + 18.0 + 17.0 * i as f64, line, "");
        }
    }
    svg.finish()
}

fn no_data(svg: &mut Svg, frame: &Frame) {
    svg.text(
        frame.left + frame.width / 2.0,
        frame.top + frame.height / 2.0,
        "no data",
        r##"text-anchor="middle" fill="#999" font-size="16""##,
    );
}

/// Three decimals, or `n/a` for a value that is not finite.
fn fmt3(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "n/a".to_string()
    }
}
