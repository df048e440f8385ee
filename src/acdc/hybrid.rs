//! The EAP→ACDC hybrid (Syed et al. 2023, §5.2): EAP scores every edge at the cost of two
//! forwards and a backward, the edges it ranks low are patched from the start, and ACDC
//! decides only the rest.

use super::AcdcOptions;
use crate::graph::{Circuit, Scores};
use crate::patching::complement;
use crate::{Error, Result};

/// What pre-prunes the graph for the hybrid (`eap acdc --prune-with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PruneWith {
    /// EAP with the task's metric.
    Eap,
}

/// The hybrid's starting mask: every real edge outside EAP's top `keep` by |score| (or with
/// |score| below `threshold`) is patched from the start.
pub fn prune_mask(
    scores: &Scores,
    keep: Option<usize>,
    threshold: Option<f32>,
) -> Result<Vec<bool>> {
    let kept = match (keep, threshold) {
        (Some(n), None) => Circuit::top_n(scores, n),
        (None, Some(t)) => Circuit::threshold(scores, t),
        _ => {
            return Err(Error::SelectionChoice {
                what: "EAP pruning",
                choices: "a number of edges to keep or a score threshold",
            })
        }
    };
    Ok(complement(&kept))
}

/// The hybrid's ACDC options: `base` with every real edge outside EAP's top `keep` by |score|
/// (or with |score| below `threshold`) patched from the start and never tried. The one place
/// the hybrid is assembled, for `eap acdc --prune-with eap` and [`crate::discover`].
pub fn hybrid(
    eap: &Scores,
    keep: Option<usize>,
    threshold: Option<f32>,
    base: AcdcOptions,
) -> Result<AcdcOptions> {
    Ok(AcdcOptions {
        initial_patched: Some(prune_mask(eap, keep, threshold)?),
        ..base
    })
}
