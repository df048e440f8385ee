//! A tiny SVG writer and the plot frame (scales, ticks, axes) the pictures share.
//!
//! Coordinates are written through [`num`], which turns NaN and infinities into 0, so no
//! picture can contain `NaN` whatever the data; text always goes through [`escape`].

use std::fmt::Write as _;

/// Escapes `&`, `<`, `>`, `"` and `'` for XML/HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A coordinate or length for an attribute: at most two decimals, never `NaN`/`inf`.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "0".to_string();
    }
    let s = format!("{:.2}", x);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" || s.is_empty() {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// An SVG document under construction. Attribute strings passed to the element methods are
/// written as they are (they come from this crate); text content is escaped.
#[derive(Debug, Clone)]
pub struct Svg {
    width: f64,
    height: f64,
    body: String,
}

impl Svg {
    pub fn new(width: f64, height: f64) -> Self {
        Svg {
            width,
            height,
            body: String::new(),
        }
    }

    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, attrs: &str) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" {attrs}/>"#,
            num(x1),
            num(y1),
            num(x2),
            num(y2)
        );
    }

    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, attrs: &str) {
        let _ = writeln!(
            self.body,
            r#"<rect x="{}" y="{}" width="{}" height="{}" {attrs}/>"#,
            num(x),
            num(y),
            num(w.max(0.0)),
            num(h.max(0.0))
        );
    }

    pub fn circle(&mut self, cx: f64, cy: f64, r: f64, attrs: &str) {
        let _ = writeln!(
            self.body,
            r#"<circle cx="{}" cy="{}" r="{}" {attrs}/>"#,
            num(cx),
            num(cy),
            num(r.max(0.0))
        );
    }

    /// A polyline through `points`; nothing when there are fewer than two.
    pub fn polyline(&mut self, points: &[(f64, f64)], attrs: &str) {
        if points.len() < 2 {
            return;
        }
        let pts: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{},{}", num(x), num(y)))
            .collect();
        let _ = writeln!(
            self.body,
            r#"<polyline points="{}" fill="none" {attrs}/>"#,
            pts.join(" ")
        );
    }

    /// A `<path>`; `tooltip`, when given, becomes its `<title>` (shown on hover).
    pub fn path(&mut self, d: &str, attrs: &str, tooltip: Option<&str>) {
        match tooltip {
            Some(t) => {
                let _ = writeln!(
                    self.body,
                    r#"<path d="{d}" {attrs}><title>{}</title></path>"#,
                    escape(t)
                );
            }
            None => {
                let _ = writeln!(self.body, r#"<path d="{d}" {attrs}/>"#);
            }
        }
    }

    pub fn text(&mut self, x: f64, y: f64, text: &str, attrs: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{}" y="{}" {attrs}>{}</text>"#,
            num(x),
            num(y),
            escape(text)
        );
    }

    /// Raw markup (an opening or closing `<g>`): the caller is responsible for it.
    pub fn raw(&mut self, markup: &str) {
        self.body.push_str(markup);
        self.body.push('\n');
    }

    /// The complete standalone document.
    pub fn finish(self) -> String {
        let (w, h) = (num(self.width), num(self.height));
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             viewBox=\"0 0 {w} {h}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n\
             <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n{}</svg>\n",
            self.body
        )
    }
}

/// Line colours for several methods, distinguishable in colour and in greyscale print.
pub const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];

pub fn palette(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// One axis: a data range mapped onto a pixel range, linear or log10.
#[derive(Debug, Clone, Copy)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
}

impl Axis {
    /// A linear axis over the finite values of `values`, widened to a usable range: `[0, 1]`
    /// when there are none, `v ± max(|v|/2, 0.5)` when all are equal, plus 5 % padding.
    pub fn linear_over(values: impl IntoIterator<Item = f64>) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.into_iter().filter(|v| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo > hi {
            return Axis::linear(0.0, 1.0);
        }
        if hi - lo <= 1e-12 * hi.abs().max(lo.abs()).max(1e-300) {
            let half = (lo.abs() / 2.0).max(0.5);
            return Axis::linear(lo - half, hi + half);
        }
        let pad = 0.05 * (hi - lo);
        Axis::linear(lo - pad, hi + pad)
    }

    pub fn linear(lo: f64, hi: f64) -> Self {
        Axis { lo, hi, log: false }
    }

    /// A log10 axis from `lo` to `hi`, widened to whole decades. Values that are not positive
    /// and finite fall back to `[0.001, 1]`.
    pub fn log(lo: f64, hi: f64) -> Self {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        let (lo, hi) = match (ok(lo), ok(hi)) {
            (true, true) => (lo.min(hi), lo.max(hi)),
            (false, true) => (hi / 1000.0, hi),
            _ => (0.001, 1.0),
        };
        Axis {
            lo: 10f64.powf(lo.log10().floor()),
            hi: 10f64.powf(hi.log10().ceil()),
            log: true,
        }
    }

    /// Position of `v` in `[0, 1]` along the axis (outside when `v` is outside the range).
    pub fn frac(&self, v: f64) -> f64 {
        let (a, b, v) = if self.log {
            (
                self.lo.log10(),
                self.hi.log10(),
                v.max(f64::MIN_POSITIVE).log10(),
            )
        } else {
            (self.lo, self.hi, v)
        };
        if (b - a).abs() < f64::MIN_POSITIVE || !v.is_finite() {
            return 0.5;
        }
        (v - a) / (b - a)
    }

    /// About `target` round tick values inside the range, with their labels.
    pub fn ticks(&self, target: usize) -> Vec<(f64, String)> {
        if self.log {
            let (a, b) = (
                self.lo.log10().round() as i32,
                self.hi.log10().round() as i32,
            );
            return (a..=b)
                .map(|e| {
                    let v = 10f64.powi(e);
                    (v, format_decade(e))
                })
                .collect();
        }
        let span = self.hi - self.lo;
        if !(span.is_finite() && span > 0.0) {
            return vec![(self.lo, format_tick(self.lo, 1.0))];
        }
        let raw = span / target.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= 0.8 * raw)
            .unwrap_or(10.0 * mag);
        let first = (self.lo / step - 1e-9).ceil() as i64;
        let last = (self.hi / step + 1e-9).floor() as i64;
        (first..=last)
            .map(|k| {
                let v = k as f64 * step;
                (v, format_tick(v, step))
            })
            .collect()
    }
}

fn format_decade(e: i32) -> String {
    match e {
        e if e >= 4 || e <= -5 => format!("1e{e}"),
        e if e >= 0 => format!("{}", 10i64.pow(e as u32)),
        e => format!("{:.*}", (-e) as usize, 10f64.powi(e)),
    }
}

/// A tick label with as many decimals as the step needs.
fn format_tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).clamp(0.0, 8.0) as usize;
    let decimals = if (step * 10f64.powi(decimals as i32)).fract().abs() > 1e-9 {
        decimals + 1
    } else {
        decimals
    };
    let s = format!("{:.*}", decimals, v);
    if s.starts_with('-') && s.trim_start_matches(['-', '0', '.']).is_empty() {
        s[1..].to_string()
    } else {
        s
    }
}

/// The plotting area of a chart and its two axes.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
    pub x: Axis,
    pub y: Axis,
}

impl Frame {
    pub fn px(&self, x: f64) -> f64 {
        self.left + self.x.frac(x) * self.width
    }

    pub fn py(&self, y: f64) -> f64 {
        self.top + (1.0 - self.y.frac(y)) * self.height
    }

    /// The point `(x, y)` in pixels, clamped to the frame so wild values stay on the canvas.
    pub fn pt(&self, x: f64, y: f64) -> (f64, f64) {
        (
            self.px(x).clamp(self.left, self.left + self.width),
            self.py(y).clamp(self.top, self.top + self.height),
        )
    }

    /// Grid, ticks, tick labels, axis labels and the title.
    pub fn draw_axes(&self, svg: &mut Svg, title: &str, x_label: &str, y_label: &str) {
        let (l, t, w, h) = (self.left, self.top, self.width, self.height);
        svg.rect(l, t, w, h, r##"fill="#fafafa" stroke="none""##);
        for (v, label) in self.x.ticks(6) {
            let x = self.px(v);
            if x < l - 0.5 || x > l + w + 0.5 {
                continue;
            }
            svg.line(x, t, x, t + h, r##"stroke="#e3e3e3""##);
            svg.line(x, t + h, x, t + h + 5.0, r##"stroke="#333""##);
            svg.text(x, t + h + 18.0, &label, r#"text-anchor="middle""#);
        }
        for (v, label) in self.y.ticks(6) {
            let y = self.py(v);
            if y < t - 0.5 || y > t + h + 0.5 {
                continue;
            }
            svg.line(l, y, l + w, y, r##"stroke="#e3e3e3""##);
            svg.line(l - 5.0, y, l, y, r##"stroke="#333""##);
            svg.text(l - 8.0, y + 4.0, &label, r#"text-anchor="end""#);
        }
        svg.rect(l, t, w, h, r##"fill="none" stroke="#333""##);
        svg.text(
            l + w / 2.0,
            t + h + 40.0,
            x_label,
            r#"text-anchor="middle" font-size="13""#,
        );
        let (yx, yy) = (l - 52.0, t + h / 2.0);
        svg.text(
            yx,
            yy,
            y_label,
            &format!(
                r#"text-anchor="middle" font-size="13" transform="rotate(-90 {} {})""#,
                num(yx),
                num(yy)
            ),
        );
        svg.text(
            l + w / 2.0,
            t - 14.0,
            title,
            r#"text-anchor="middle" font-size="15" font-weight="bold""#,
        );
    }
}

/// A legend box: one coloured line sample (solid, or dashed) and a label per entry.
pub fn legend(svg: &mut Svg, x: f64, y: f64, entries: &[(String, String, bool)]) {
    if entries.is_empty() {
        return;
    }
    let (w, h) = legend_size(entries);
    svg.rect(
        x,
        y,
        w,
        h,
        r##"fill="white" fill-opacity="0.9" stroke="#999" rx="3""##,
    );
    for (i, (colour, label, dashed)) in entries.iter().enumerate() {
        let cy = y + 13.0 + 18.0 * i as f64;
        let dash = if *dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        svg.line(
            x + 6.0,
            cy,
            x + 28.0,
            cy,
            &format!(r#"stroke="{colour}" stroke-width="2.5"{dash}"#),
        );
        svg.text(x + 34.0, cy + 4.0, label, "");
    }
}

/// Width and height of the [`legend`] box (text width estimated at 12 px Helvetica).
pub fn legend_size(entries: &[(String, String, bool)]) -> (f64, f64) {
    let longest = entries
        .iter()
        .map(|e| e.1.chars().count())
        .max()
        .unwrap_or(0) as f64;
    (44.0 + 6.8 * longest, 8.0 + 18.0 * entries.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<a href="x">&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn numbers_are_never_nan() {
        assert_eq!(num(f64::NAN), "0");
        assert_eq!(num(f64::INFINITY), "0");
        assert_eq!(num(1.5), "1.5");
        assert_eq!(num(2.0), "2");
        assert_eq!(num(-0.001), "0");
    }

    #[test]
    fn degenerate_axes_get_a_range() {
        let a = Axis::linear_over([]);
        assert_eq!((a.lo, a.hi), (0.0, 1.0));
        let a = Axis::linear_over([3.0, 3.0]);
        assert!(a.lo < 3.0 && a.hi > 3.0);
        let a = Axis::linear_over([0.0, 0.0, f64::NAN]);
        assert!(a.lo < 0.0 && a.hi > 0.0);
        assert!(!a.ticks(5).is_empty());
    }

    #[test]
    fn ticks_are_round() {
        let labels: Vec<String> = Axis::linear(0.0, 1.0)
            .ticks(5)
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let labels: Vec<String> = Axis::log(0.001, 1.0)
            .ticks(5)
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert_eq!(labels, ["0.001", "0.01", "0.1", "1"]);
        assert!(Axis::log(0.0, -1.0).ticks(5).len() < 10);
        assert!(Axis::log(f64::NAN, 1.0).ticks(5).len() < 10);
        let labels: Vec<String> = Axis::linear(-0.3, 0.3)
            .ticks(5)
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert!(labels.contains(&"0.0".to_string()), "{labels:?}");
    }
}
