//! Progress of long runs, on standard error: a bar on a terminal, a plain line-per-step log
//! when standard error is a file or a pipe (a CI log, `2> run.log`), nothing under `--quiet`.
//!
//! Every loop that can run for more than a second (attribution over chunks, exact patching over
//! edges, ACDC over readers, dataset generation, the benchmark's stages, MIB's budgets) makes
//! one [`Progress`] and calls [`Progress::inc`] per step. The plain log always prints the first
//! and the last step — so even a short run says it ran, and how long it took — and in between at
//! most one line every [`MIN_INTERVAL`], only when another tenth of the steps is done or
//! [`MAX_INTERVAL`] has passed: a few dozen lines for an hour-long run, never a flood. Each
//! line gives the step, the total, the time so far and an estimate of the time left.
//!
//! The binary's `--quiet` calls [`set_quiet`], which silences every [`Progress`] of the
//! process; callers that run a loop as part of a larger one pass `enabled = false`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Set by `--quiet`: no progress of any kind.
static QUIET: AtomicBool = AtomicBool::new(false);

/// The shortest time between two lines of the plain log.
pub const MIN_INTERVAL: Duration = Duration::from_secs(2);
/// The longest time between two lines of the plain log, however slowly the steps go.
pub const MAX_INTERVAL: Duration = Duration::from_secs(30);

/// Silences (or restores) every progress report of this process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether progress is silenced ([`set_quiet`]).
pub fn is_quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// One loop's progress; see the module documentation.
pub struct Progress {
    inner: Inner,
}

enum Inner {
    Hidden,
    Bar(ProgressBar),
    Log(LineLog),
}

/// The plain log's state.
struct LineLog {
    label: String,
    unit: &'static str,
    total: u64,
    /// Where the loop started (a resumed run starts part-way); rates count from here.
    first: u64,
    pos: u64,
    message: String,
    start: Instant,
    /// When the last line was printed and at which step (`None` before the first).
    last: Option<(Instant, u64)>,
}

impl Progress {
    /// Progress of `total` steps of `unit` (plural: "examples", "edges"), labelled `label`
    /// ("EAP scores"); hidden when `enabled` is false or under `--quiet`.
    pub fn new(enabled: bool, label: impl Into<String>, total: usize, unit: &'static str) -> Self {
        let label = label.into();
        let inner = if !enabled || is_quiet() {
            Inner::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            let template = format!(
                "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{elapsed}}, ETA {{eta}} {{msg}}"
            );
            bar.set_style(
                ProgressStyle::with_template(&template)
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(label);
            Inner::Bar(bar)
        } else {
            Inner::Log(LineLog {
                label,
                unit,
                total: total as u64,
                first: 0,
                pos: 0,
                message: String::new(),
                start: Instant::now(),
                last: None,
            })
        };
        Progress { inner }
    }

    /// Progress that shows nothing.
    pub fn hidden() -> Self {
        Progress {
            inner: Inner::Hidden,
        }
    }

    /// Starts part-way, at step `pos` (a resumed run); the estimate counts only new steps.
    pub fn set_position(&mut self, pos: usize) {
        match &mut self.inner {
            Inner::Hidden => {}
            Inner::Bar(bar) => bar.set_position(pos as u64),
            Inner::Log(log) => {
                log.pos = pos as u64;
                log.first = pos as u64;
            }
        }
    }

    /// Text shown after the counts (the bar's message, the end of each log line).
    pub fn set_message(&mut self, message: impl Into<String>) {
        match &mut self.inner {
            Inner::Hidden => {}
            Inner::Bar(bar) => bar.set_message(message.into()),
            Inner::Log(log) => log.message = message.into(),
        }
    }

    /// `n` more steps done.
    pub fn inc(&mut self, n: usize) {
        match &mut self.inner {
            Inner::Hidden => {}
            Inner::Bar(bar) => bar.inc(n as u64),
            Inner::Log(log) => {
                log.pos = log.pos.saturating_add(n as u64).min(log.total);
                let now = Instant::now();
                if log.due(now) {
                    log.print(now);
                }
            }
        }
    }

    /// The loop is over: the bar is cleared (the command prints its own result).
    pub fn finish(self) {
        if let Inner::Bar(bar) = &self.inner {
            bar.finish_and_clear();
        }
    }
}

impl LineLog {
    /// Whether the step just done gets a line: the first and the last always; others when
    /// [`MIN_INTERVAL`] has passed and either a new tenth of the steps is done or
    /// [`MAX_INTERVAL`] has passed.
    fn due(&self, now: Instant) -> bool {
        let Some((at, at_pos)) = self.last else {
            return true;
        };
        if self.pos >= self.total {
            return at_pos < self.pos;
        }
        let since = now.duration_since(at);
        let tenth = |p: u64| p.saturating_mul(10) / self.total.max(1);
        since >= MIN_INTERVAL && (tenth(self.pos) > tenth(at_pos) || since >= MAX_INTERVAL)
    }

    fn print(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.start);
        let percent = self.pos.saturating_mul(100) / self.total.max(1);
        let when = if self.pos >= self.total {
            format!("done in {}", human(elapsed))
        } else {
            let done = self.pos - self.first;
            let left = self.total - self.pos;
            let eta = match done {
                0 => "unknown".to_string(),
                _ => human(elapsed.mul_f64(left as f64 / done as f64)),
            };
            format!("{} elapsed, ETA {eta}", human(elapsed))
        };
        let message = match self.message.is_empty() {
            true => String::new(),
            false => format!(" ({})", self.message),
        };
        let line = format!(
            "{}: {}/{} {} ({percent}%), {when}{message}\n",
            self.label, self.pos, self.total, self.unit
        );
        // A progress line that cannot be written (stderr closed) is not worth failing the run.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        self.last = Some((now, self.pos));
    }
}

/// A duration as people read it: `0.4 s`, `12 s`, `3 min 05 s`, `2 h 07 min`.
fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        let s = s.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        let m = (s / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(total: u64) -> LineLog {
        LineLog {
            label: "t".into(),
            unit: "steps",
            total,
            first: 0,
            pos: 0,
            message: String::new(),
            start: Instant::now(),
            last: None,
        }
    }

    #[test]
    fn the_log_prints_first_and_last_and_is_rate_limited() {
        let mut l = log(100);
        let t0 = Instant::now();
        l.pos = 1;
        assert!(l.due(t0), "the first step always gets a line");
        l.last = Some((t0, 1));
        // A new tenth, but too soon after the last line.
        l.pos = 20;
        assert!(!l.due(t0 + Duration::from_millis(500)));
        // A new tenth after MIN_INTERVAL.
        assert!(l.due(t0 + MIN_INTERVAL));
        // The same tenth, after MIN_INTERVAL but before MAX_INTERVAL: no line.
        l.pos = 5;
        assert!(!l.due(t0 + MIN_INTERVAL));
        assert!(l.due(t0 + MAX_INTERVAL));
        // The last step always gets a line, however soon.
        l.pos = 100;
        assert!(l.due(t0));
        l.last = Some((t0, 100));
        assert!(!l.due(t0), "the last step is printed once");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_millis(420)), "0.4 s");
        assert_eq!(human(Duration::from_secs(12)), "12 s");
        assert_eq!(human(Duration::from_secs(185)), "3 min 05 s");
        assert_eq!(human(Duration::from_secs(2 * 3600 + 7 * 60)), "2 h 07 min");
    }
}
