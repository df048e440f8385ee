//! Persistence of an ACDC run.
//!
//! [`Persist`] writes a JSONL log line per step (edge, metric change, kept/removed) and an
//! atomic checkpoint ([`Checkpoint`], written to a temporary file in the same folder, synced,
//! then renamed) after every reader. With `resume`, a run restarts after the last finished
//! reader and, since every decision depends only on the patched set and the deterministic
//! forward, reaches the same circuit as an uninterrupted run. The log is cut back to the
//! checkpoint's step count on resume.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::graph::Graph;
use crate::runs::PreparedChunk;
use crate::tasks::Metric;
use crate::{Error, Result};

/// Where a run keeps its log and checkpoints.
#[derive(Debug, Clone)]
pub struct Persist {
    pub checkpoint: PathBuf,
    pub log: PathBuf,
    /// Continue from `checkpoint` when it exists.
    pub resume: bool,
}

impl Persist {
    /// `circuit.json` → `circuit.acdc-checkpoint.json` and `circuit.acdc-steps.jsonl`.
    pub fn beside(out: &Path, resume: bool) -> Persist {
        let stem = out
            .file_stem()
            .map_or("circuit".to_string(), |s| s.to_string_lossy().into_owned());
        let dir = out.parent().unwrap_or(Path::new(""));
        Persist {
            checkpoint: dir.join(format!("{stem}.acdc-checkpoint.json")),
            log: dir.join(format!("{stem}.acdc-steps.jsonl")),
            resume,
        }
    }
}

/// The state after a finished reader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// What the run was started with; a resume must match it.
    pub fingerprint: serde_json::Value,
    /// Position in [`visit_order`](crate::graph::visit_order) of the next reader to visit.
    pub next_position: usize,
    /// `[n_writers, n_readers]` patched mask as a string of `0`/`1`.
    pub patched: String,
    /// `(matrix index, Δ)` of every tried edge.
    pub scores: Vec<(usize, f32)>,
    pub metric: f32,
    pub initial_metric: f32,
    pub forward_passes: usize,
    pub steps_logged: usize,
    pub seconds: f64,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("not an ACDC checkpoint ({e})"),
        })
    }

    pub(super) fn write_atomic(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).map_err(|e| Error::invalid(e.to_string()))?;
        write_atomic(path, &bytes)
    }
}

pub(super) fn mask_string(mask: &[bool]) -> String {
    mask.iter().map(|&b| if b { '1' } else { '0' }).collect()
}

/// The patched mask of the checkpoint at `path`.
pub(super) fn parse_mask(path: &Path, s: &str, len: usize) -> Result<Vec<bool>> {
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if s.len() != len {
        return Err(bad(format!(
            "the mask has {} entries, expected {len}",
            s.len()
        )));
    }
    s.chars()
        .map(|c| match c {
            '0' => Ok(false),
            '1' => Ok(true),
            other => Err(bad(format!("the mask holds `{other}`"))),
        })
        .collect()
}

/// What a run is started with, as its checkpoints record it: a resume must match it.
pub(super) fn fingerprint(
    graph: &Graph,
    threshold: f32,
    metric: Metric,
    initial_patched: Option<&Vec<bool>>,
    prepared: &[PreparedChunk],
) -> serde_json::Value {
    // FNV-1a over the indices of the initially patched edges.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    if let Some(mask) = initial_patched {
        for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
            for b in (i as u64).to_le_bytes() {
                hash ^= b as u64;
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    let n_examples: usize = prepared.iter().map(|p| p.chunk.indices.len()).sum();
    serde_json::json!({
        "graph": graph,
        "threshold": threshold,
        "metric": metric.to_string(),
        "n_examples": n_examples,
        "initial_patched": initial_patched.map(|m| m.iter().filter(|&&b| b).count()),
        "initial_patched_hash": format!("{hash:016x}"),
    })
}

/// Reads the first `n` complete lines of the step log and cuts the file back to them.
pub(super) fn restore_log<Step: DeserializeOwned>(path: &Path, n: usize) -> Result<Vec<Step>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut steps = Vec::with_capacity(n);
    let mut bytes = 0u64;
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    while steps.len() < n {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|e| Error::io(path, e))?;
        if read == 0 || !line.ends_with('\n') {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("the step log has fewer than the checkpoint's {n} steps"),
            });
        }
        bytes += read as u64;
        steps.push(
            serde_json::from_str(line.trim_end()).map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("bad step line ({e})"),
            })?,
        );
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.set_len(bytes).map_err(|e| Error::io(path, e))?;
    Ok(steps)
}
