//! Persistence of an ACDC run.
//!
//! [`Persist`] writes a JSONL log line per step (edge, metric change, kept/removed) and an
//! atomic checkpoint ([`Checkpoint`], written to a temporary file in the same folder, synced,
//! then renamed) after every reader. With `resume`, a run restarts after the last finished
//! reader and, since every decision depends only on the patched set and the deterministic
//! forward, reaches the same circuit as an uninterrupted run. The log is cut back to the
//! checkpoint's step count on resume.
//!
//! **Identity.** A checkpoint records the run's [`RunIdentity`] — the model files, the examples
//! and every option that changes results — and [`validate`] holds a checkpoint's contents to
//! the run before anything is resumed: a mismatch names each field that differs (old and new
//! value), and a mask, position, score list or step count that no run could have written is
//! refused rather than trusted.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::graph::{visit_order, Graph};
use crate::job::JobSpec;
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

/// The checkpoint format this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 2;

/// Weight files up to this size are hashed whole; larger ones by size, mtime and header.
pub const CONTENT_HASH_LIMIT: u64 = 512 << 20;

/// Everything besides the graph that determines an ACDC run, as named fields: a resume must
/// match it field for field.
///
/// * The model: every regular file of its directory (config, weights, shard index,
///   tokenizer), by name. A file up to [`CONTENT_HASH_LIMIT`] is identified by its size and a
///   hash of its whole content; a larger one (a multi-GB safetensors shard, where hashing would
///   cost seconds) by its size, its modification time and a hash of its first
///   [`HEADER_BYTES`] bytes, which hold the safetensors header (names, dtypes, shapes and
///   offsets) — so rewriting a big shard in place changes its mtime and is caught, an edit
///   that keeps the mtime is not.
/// * The examples: a `--data` file's content hash; a generated task's or a planted model's
///   generator name, `n` and seed.
/// * The options, added by the caller with [`RunIdentity::with`]: metric, ablation, seed,
///   threshold, batch size, hybrid settings and the eap version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity(pub BTreeMap<String, String>);

/// Bytes hashed at the start of a weight file too large to hash whole.
pub const HEADER_BYTES: u64 = 1 << 20;

impl RunIdentity {
    /// The model and examples `spec` names, plus the eap version.
    pub fn of_job(spec: &JobSpec) -> Result<RunIdentity> {
        let mut id = RunIdentity::default().with("eap version", env!("CARGO_PKG_VERSION"));
        match &spec.model {
            Some(name) => {
                let dir = crate::model::resolve_model_dir(name)?;
                let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map_err(|e| Error::io(&dir, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file())
                    .collect();
                entries.sort();
                for path in entries {
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    id = id.with(format!("model file {name}"), file_identity(&path)?);
                }
            }
            None => {
                let kind = spec
                    .planted
                    .unwrap_or(crate::planted::PlantedKind::Induction);
                id = id.with("planted model", kind);
            }
        }
        if let Some(tok) = &spec.tokenizer {
            id = id.with("tokenizer", file_identity(tok)?);
        }
        let ex = &spec.examples;
        match (&ex.data, ex.task) {
            (Some(path), _) => id = id.with("data", file_identity(path)?),
            (None, task) => {
                let generator = task.map_or("the planted model's own".to_string(), |t| {
                    t.name().to_string()
                });
                id = id
                    .with("task", generator)
                    .with("n", ex.n)
                    .with("seed", ex.seed);
            }
        }
        Ok(id)
    }

    /// This identity with `key` set to `value`.
    pub fn with(mut self, key: impl Into<String>, value: impl std::fmt::Display) -> RunIdentity {
        self.0.insert(key.into(), value.to_string());
        self
    }
}

/// A file's identity as [`RunIdentity`] describes it.
fn file_identity(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let size = meta.len();
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    if size <= CONTENT_HASH_LIMIT {
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        return Ok(format!(
            "{size} bytes, content hash {:016x}",
            hash64(&bytes)
        ));
    }
    let mut head = Vec::new();
    file.take(HEADER_BYTES)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!(
        "{size} bytes, mtime {mtime} ns, header hash {:016x}",
        hash64(&head)
    ))
}

/// A fast 64-bit hash (FNV-1a over 8-byte words, then the tail bytes): not cryptographic,
/// but any one changed byte changes it.
fn hash64(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = h.wrapping_mul(PRIME).rotate_left(31);
    }
    for &b in words.remainder() {
        h ^= b as u64;
        h = h.wrapping_mul(PRIME);
    }
    h ^ (h >> 29)
}

/// The state after a finished reader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// What the run was started with ([`fingerprint`]); a resume must match it.
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
    identity: &RunIdentity,
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
        "run": identity,
    })
}

/// `fingerprint` flattened to `field → value` (the run identity's fields under their own
/// names), for naming what differs.
fn flat_fields(fp: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(map) = fp.as_object() {
        for (k, v) in map {
            match (k.as_str(), v.as_object()) {
                ("run", Some(run)) => {
                    for (k, v) in run {
                        out.insert(k.clone(), v.as_str().map_or(v.to_string(), String::from));
                    }
                }
                _ => {
                    out.insert(k.clone(), v.to_string());
                }
            }
        }
    } else {
        out.insert("fingerprint".into(), fp.to_string());
    }
    out
}

/// The fields in which `old` (a checkpoint's) and `new` (this run's) fingerprints differ, as
/// `field: old → new` lines; empty when they agree.
pub(super) fn fingerprint_diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (a, b) = (flat_fields(old), flat_fields(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let none = "(not recorded)".to_string();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} (checkpoint) vs {} (this run)",
                a.get(k).unwrap_or(&none),
                b.get(k).unwrap_or(&none)
            )
        })
        .collect()
}

/// What a validated checkpoint resumes from.
pub(super) struct Resumed {
    pub patched: Vec<bool>,
    pub position: usize,
}

/// Holds `ck` to the run that would resume it: the same fingerprint, and contents a run of
/// this graph could have written — a position within the visit order, a mask of the graph's
/// size patching only real edges (every initially patched one, plus edges into visited
/// readers only), scores on tried edges only, finite metrics, and a step count equal to the
/// edges of the visited readers. `path` names the checkpoint in errors.
pub(super) fn validate(
    path: &Path,
    ck: &Checkpoint,
    fp: &serde_json::Value,
    graph: &Graph,
    initial: &[bool],
) -> Result<Resumed> {
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if ck.version != CHECKPOINT_VERSION {
        return Err(bad(format!(
            "checkpoint format version {}, this eap reads version {CHECKPOINT_VERSION}",
            ck.version
        )));
    }
    let diff = fingerprint_diff(&ck.fingerprint, fp);
    if !diff.is_empty() {
        return Err(bad(format!(
            "written by a different ACDC run; what differs:\n  {}",
            diff.join("\n  ")
        )));
    }
    let (nw, nr) = (graph.n_writers(), graph.n_readers());
    let order = visit_order(graph);
    if ck.next_position > order.len() {
        return Err(bad(format!(
            "next_position {} is beyond the {} readers of the visit order",
            ck.next_position,
            order.len()
        )));
    }
    let patched = parse_mask(path, &ck.patched, nw * nr)?;
    let real = graph.real_edge_mask();
    let mut visited = vec![false; nr];
    for &r in &order[..ck.next_position] {
        visited[r] = true;
    }
    let mut expected_steps = 0usize;
    for (i, (&p, &is_real)) in patched.iter().zip(&real).enumerate() {
        let (w, r) = (i / nr, i % nr);
        let name = || graph.edge_name(w, r);
        if p && !is_real {
            return Err(bad(format!(
                "the mask patches entry {i} ({w}, {r}), which is not an edge"
            )));
        }
        if initial[i] && !p {
            return Err(bad(format!(
                "the mask leaves {} unpatched, which the run patches from the start",
                name()
            )));
        }
        if p && !initial[i] && !visited[r] {
            return Err(bad(format!(
                "the mask patches {}, whose reader is not visited yet",
                name()
            )));
        }
        if is_real && !initial[i] && visited[r] {
            expected_steps += 1;
        }
    }
    for &(i, v) in &ck.scores {
        if i >= nw * nr || !real[i] || !visited[i % nr] || initial[i] {
            return Err(bad(format!(
                "score index {i} is not an edge ACDC has tried"
            )));
        }
        if !v.is_finite() {
            return Err(bad(format!("the score of entry {i} is {v}")));
        }
    }
    if ck.steps_logged != expected_steps {
        return Err(bad(format!(
            "steps_logged is {}, but the {} visited readers have {expected_steps} edges",
            ck.steps_logged, ck.next_position
        )));
    }
    for (what, v) in [("metric", ck.metric), ("initial_metric", ck.initial_metric)] {
        if !v.is_finite() {
            return Err(bad(format!("{what} is {v}")));
        }
    }
    if !(ck.seconds.is_finite() && ck.seconds >= 0.0) {
        return Err(bad(format!("seconds is {}", ck.seconds)));
    }
    Ok(Resumed {
        patched,
        position: ck.next_position,
    })
}

/// Checks the restored step log against the checkpoint's mask: each step is an edge into a
/// visited reader, each such edge logged once, and an edge removed exactly when it is
/// patched (beyond the initial mask). `steps` are `(writer, reader, removed, edge name)`.
pub(super) fn validate_steps(
    log: &Path,
    steps: &[(usize, usize, bool, &str)],
    graph: &Graph,
    patched: &[bool],
    initial: &[bool],
) -> Result<()> {
    let nr = graph.n_readers();
    let mut seen = vec![false; patched.len()];
    for (n, &(writer, reader, removed, edge)) in steps.iter().enumerate() {
        let i = writer.checked_mul(nr).and_then(|x| x.checked_add(reader));
        let ok = reader < nr && i.is_some_and(|i| i < patched.len() && !seen[i]);
        let i = match (ok, i) {
            (true, Some(i)) => i,
            _ => {
                return Err(Error::Checkpoint {
                    path: log.to_path_buf(),
                    message: format!("step {} ({}) is not a new edge of the graph", n + 1, edge),
                })
            }
        };
        seen[i] = true;
        if removed != (patched[i] && !initial[i]) {
            return Err(Error::Checkpoint {
                path: log.to_path_buf(),
                message: format!(
                    "step {} says {} was {}, the checkpoint's mask disagrees",
                    n + 1,
                    edge,
                    if removed { "removed" } else { "kept" }
                ),
            });
        }
    }
    Ok(())
}

/// Removes temporary checkpoint files (`.<name>.<pid>.tmp`) a killed run left beside
/// `checkpoint`.
pub(super) fn remove_stale_temporaries(checkpoint: &Path) {
    let (Some(dir), Some(name)) = (checkpoint.parent(), checkpoint.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let pid = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tmp"));
        if pid.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
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
