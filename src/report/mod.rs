//! Pictures (SVG written by hand, no graphviz) and the self-contained HTML report.
//!
//! * [`circuit_svg`] draws a [`Circuit`](crate::graph::Circuit), optionally weighted by its
//!   [`Scores`](crate::graph::Scores).
//! * [`roc_svg`], [`faithfulness_svg`] and [`scatter_svg`] chart the values of [`crate::eval`].
//! * [`Report`] gathers tables, figures and text into one HTML page with inline CSS and inline
//!   SVG, so the file can be mailed or archived alone; it shows the exact command that made it.
//!
//! Every picture is a complete `<svg>` document with `width`, `height` and `viewBox`, valid
//! XML, and free of `NaN` whatever the input (see [`svg::num`]).

mod circuit;
mod plots;
pub mod svg;

use std::path::Path;

pub use circuit::circuit_svg;
pub use plots::{faithfulness_svg, mib_svg, roc_svg, scatter_svg};

use crate::Result;
use svg::escape;

/// One HTML page of results.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub title: String,
    /// The command line that produced the report, shown verbatim.
    pub command: String,
    pub sections: Vec<Section>,
}

/// A part of a [`Report`], in page order.
#[derive(Debug, Clone, PartialEq)]
pub enum Section {
    Table {
        title: String,
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// `svg` is inserted as it is (it should come from this module); title and caption are text.
    Figure {
        title: String,
        svg: String,
        caption: String,
    },
    /// `body` is plain text; blank lines separate paragraphs.
    Text { title: String, body: String },
}

const CSS: &str = "\
body{font-family:Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.3em}
h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
pre{background:#f4f4f4;border:1px solid #ddd;border-radius:4px;padding:.7em 1em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
table{border-collapse:collapse;margin:.5em 0;font-size:.95em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}
th{background:#f0f0f0}
tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}
figure .svg{overflow-x:auto}
figure svg{max-width:100%;height:auto}
figcaption{color:#555;font-size:.92em;margin-top:.4em}
footer{margin-top:3em;color:#888;font-size:.85em}
";

impl Report {
    pub fn new(title: impl Into<String>, command: impl Into<String>) -> Self {
        Report {
            title: title.into(),
            command: command.into(),
            sections: Vec::new(),
        }
    }

    /// The page: one self-contained HTML document, no external resources.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        h.push_str(&format!("<title>{}</title>\n", escape(&self.title)));
        h.push_str(&format!("<style>\n{CSS}</style>\n</head>\n<body>\n"));
        h.push_str(&format!("<h1>{}</h1>\n", escape(&self.title)));
        h.push_str("<p>Produced by this command:</p>\n");
        h.push_str(&format!(
            "<pre><code>{}</code></pre>\n",
            escape(&self.command)
        ));
        for section in &self.sections {
            match section {
                Section::Table {
                    title,
                    header,
                    rows,
                } => {
                    h.push_str(&format!("<section>\n<h2>{}</h2>\n<table>\n", escape(title)));
                    if !header.is_empty() {
                        h.push_str("<thead><tr>");
                        for cell in header {
                            h.push_str(&format!("<th>{}</th>", escape(cell)));
                        }
                        h.push_str("</tr></thead>\n");
                    }
                    h.push_str("<tbody>\n");
                    for row in rows {
                        h.push_str("<tr>");
                        for cell in row {
                            let class = if looks_numeric(cell) {
                                " class=\"num\""
                            } else {
                                ""
                            };
                            h.push_str(&format!("<td{class}>{}</td>", escape(cell)));
                        }
                        h.push_str("</tr>\n");
                    }
                    h.push_str("</tbody>\n</table>\n</section>\n");
                }
                Section::Figure {
                    title,
                    svg,
                    caption,
                } => {
                    h.push_str(&format!(
                        "<section>\n<h2>{}</h2>\n<figure>\n<div class=\"svg\">\n{}</div>\n",
                        escape(title),
                        svg
                    ));
                    if !caption.is_empty() {
                        h.push_str(&format!("<figcaption>{}</figcaption>\n", escape(caption)));
                    }
                    h.push_str("</figure>\n</section>\n");
                }
                Section::Text { title, body } => {
                    h.push_str(&format!("<section>\n<h2>{}</h2>\n", escape(title)));
                    for para in body.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
                        h.push_str(&format!(
                            "<p>{}</p>\n",
                            escape(para).replace('\n', "<br>\n")
                        ));
                    }
                    h.push_str("</section>\n");
                }
            }
        }
        h.push_str(&format!(
            "<footer>eap {}</footer>\n</body>\n</html>\n",
            env!("CARGO_PKG_VERSION")
        ));
        h
    }

    /// Writes the page to `path` atomically: a temporary file in the same directory, then a
    /// rename, so a reader never sees half a report.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::fsutil::write_atomic(path.as_ref(), self.to_html().as_bytes())
    }
}

fn looks_numeric(cell: &str) -> bool {
    let t = cell.trim().trim_end_matches('%');
    !t.is_empty() && t.parse::<f64>().is_ok()
}

#[cfg(test)]
mod tests;
