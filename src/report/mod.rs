//! Pictures (SVG, no graphviz) and the self-contained HTML report.
