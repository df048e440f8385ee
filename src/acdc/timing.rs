//! ACDC's unit of work timed: tentative patches from any point of the visit order, for
//! `eap bench` ([`crate::bench`]).

use std::time::Instant;

use super::{visit_reader, AcdcOptions, AcdcState};
use crate::graph::Scores;
use crate::model::Model;
use crate::runs::PreparedChunk;
use crate::Result;

/// What [`time_steps`] measured.
#[derive(Debug, Clone, Copy)]
pub struct StepTiming {
    /// Forward passes (tentative patches × chunks) in the timed part.
    pub passes: usize,
    /// Tentative patches whose edge stayed removed.
    pub removed: usize,
    /// Wall time of the steps, reader boundaries included; the state's build excluded.
    pub seconds: f64,
    /// The one full pass that builds the state.
    pub build_seconds: f64,
    /// Nodes of the starting circuit needed at the metric's rows only, and at every row.
    pub nodes_last_only: usize,
    pub nodes_all_rows: usize,
}

impl StepTiming {
    pub fn passes_per_second(&self) -> f64 {
        self.passes as f64 / self.seconds.max(1e-9)
    }
}

/// Runs ACDC for `steps` tentative patches from visit position `position`, with `patched` as
/// the circuit so far (readers before `position` decided), and times them: the benchmark of
/// ACDC's unit of work at any depth of the graph.
pub fn time_steps(
    model: &Model,
    prepared: &[PreparedChunk],
    opts: &AcdcOptions,
    patched: Vec<bool>,
    position: usize,
    steps: usize,
) -> Result<StepTiming> {
    let graph = model.graph();
    let t = Instant::now();
    let mut state = AcdcState::build(model, prepared, opts.metric, patched, position)?;
    let build_seconds = t.elapsed().as_secs_f64();
    let (build_passes, mut current) = (state.passes, state.metric());
    let (nodes_last_only, nodes_all_rows) = state.row_restricted_nodes();
    let mut scores = Scores::zeros(graph);
    let mut log = Vec::new();
    let t = Instant::now();
    let mut tries = 0;
    while tries < steps && state.visiting().is_some() {
        tries += visit_reader(
            &mut state,
            opts,
            &mut current,
            &mut scores,
            &mut log,
            Some(steps - tries),
        )?
        .tries;
    }
    Ok(StepTiming {
        passes: state.passes - build_passes,
        removed: log.iter().filter(|s| s.tried && s.removed).count(),
        seconds: t.elapsed().as_secs_f64(),
        build_seconds,
        nodes_last_only,
        nodes_all_rows,
    })
}
