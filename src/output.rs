//! How the `eap` binary talks: result lines on standard output through [`out!`] (a closed
//! pipe is an error `main` treats as success, not a panic), status lines that move to
//! standard error when the result itself goes to standard output (`--out -`), usage errors
//! (exit 2) the flag parser cannot express, the check of every output path before a command
//! starts, the notice of `--allow-missing` when a score file is read, and the note on what
//! pruning removed. A module of `src/main.rs`, not of the library.

use std::path::Path;

use anyhow::{bail, Result};
use eap::graph::{CircuitFile, MissingEdges};

/// Writes one line to standard output, returning the error of a closed pipe rather than
/// panicking (see `main`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// A status line: on standard output, or on standard error when the command's result goes
/// to standard output (`--out -`).
macro_rules! status {
    ($to_stderr:expr, $($arg:tt)*) => {{
        if $to_stderr {
            eprintln!($($arg)*);
        } else {
            out!($($arg)*);
        }
    }};
}

/// A usage error the flags' parser cannot express: printed as clap prints its own, exit 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Whether `err` comes from writing to a closed standard output.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        let io = e
            .downcast_ref::<std::io::Error>()
            .or_else(|| match e.downcast_ref() {
                Some(eap::Error::Io { error, .. }) => Some(error),
                _ => None,
            });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Checks every output path of a command before it starts working (see
/// [`eap::fsutil::check_output_path`]); `-` is accepted only where `stdout_ok`.
pub fn check_outputs(outputs: &[(&str, Option<&std::path::Path>, bool)]) -> Result<()> {
    for &(flag, path, stdout_ok) in outputs {
        let Some(path) = path else { continue };
        if eap::fsutil::is_stdout(path) && !stdout_ok {
            bail!(Usage(format!(
                "{flag} -: this output cannot go to standard output; give a file path"
            )));
        }
        eap::fsutil::check_output_path(path, flag, stdout_ok)?;
    }
    Ok(())
}

/// What `eap circuit` adds to its status line when pruning removed some of the `kept +
/// pruned` edges the selection chose (so `--top-n 20` giving 10 edges is explained).
pub fn pruning_note(pruned: usize, kept: usize) -> String {
    match pruned {
        0 => String::new(),
        _ => format!(
            "; pruning removed {pruned} of the {} selected edges (their nodes lost every input or output; --no-prune keeps them)",
            kept + pruned
        ),
    }
}

/// Reads a scores (or circuit) file that must list every edge of its graph, unless
/// `allow_missing`; then the number of edges filled with 0 is said on stderr.
pub fn read_scores(path: &Path, allow_missing: bool) -> Result<CircuitFile> {
    let missing = match allow_missing {
        true => MissingEdges::Fill,
        false => MissingEdges::Refuse,
    };
    let read = CircuitFile::read_scores(path, missing)?;
    if read.missing > 0 {
        let (n, all) = (read.missing, read.file.graph.n_edges());
        eprintln!(
            "{}: {n} of {all} edges not listed, filled with score 0 and left out of the circuit (--allow-missing)",
            path.display()
        );
    }
    Ok(read.file)
}
