//! Loading one program into the kernel with the verifier's statistics.
//!
//! Every program is loaded at the verifier's statistics log level (a short
//! log: one line of instructions processed and states, and the time). The
//! figures are returned to the caller (`fathom-agent check` prints them)
//! and checked against the verification budget: a program near the
//! verifier's limit breaks on the next kernel patch release or toolchain
//! build.
//!
//! A rejected program becomes one [`LoadError`] with a one-sentence reason;
//! unless the verifier ran out of its budget, the program is loaded once
//! more at the verbose level and the whole log is written to a file named in
//! the error.
use std::{path::PathBuf, time::Duration};

use aya::{
    VerifierLogLevel,
    programs::{ProgramError, override_verifier_log_level, take_verifier_log},
};

/// Instructions the verifier may process for one program of ours, on any
/// supported kernel (the kernel's own limit is 1,000,000).
pub const BUDGET_PROCESSED_INSNS: u64 = 200_000;
/// Verifier states alive at once for one program of ours.
pub const BUDGET_PEAK_STATES: u64 = 20_000;

/// The statistics line of a verifier log (`log_level` 4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifierStats {
    pub processed_insns: u64,
    pub total_states: u64,
    pub peak_states: u64,
    pub verification_time: Duration,
}

impl VerifierStats {
    /// Whether the figures are within the verification budget.
    pub fn within_budget(&self) -> bool {
        self.processed_insns <= BUDGET_PROCESSED_INSNS && self.peak_states <= BUDGET_PEAK_STATES
    }

    /// The verifier gave up: the program is too complex for it.
    pub fn too_complex(&self) -> bool {
        self.processed_insns >= 1_000_000
    }
}

/// Reads `processed N insns (limit 1000000) max_states_per_insn N
/// total_states N peak_states N mark_read N` and `verification time N usec`
/// from a verifier log. `None` when the log has no statistics line.
pub fn parse_stats(log: &str) -> Option<VerifierStats> {
    let mut stats = VerifierStats::default();
    let mut found = false;
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "processed")
            && words.get(i + 2) == Some(&"insns")
        {
            stats.processed_insns = words.get(i + 1)?.parse().ok()?;
            found = true;
            for pair in words.windows(2) {
                match pair[0] {
                    "total_states" => stats.total_states = pair[1].parse().ok()?,
                    "peak_states" => stats.peak_states = pair[1].parse().ok()?,
                    _ => {}
                }
            }
        }
        if let Some(rest) = line.strip_prefix("verification time ")
            && let Some(us) = rest.split_whitespace().next()
            && let Ok(us) = us.parse::<u64>()
        {
            stats.verification_time = Duration::from_micros(us);
        }
    }
    found.then_some(stats)
}

/// Programs named here (comma-separated) fail to load without reaching the
/// kernel, so that tests can force each degradation.
pub const FAIL_LOAD_ENV: &str = "FATHOM_FAIL_LOAD";

fn forced_to_fail(program: &str) -> bool {
    std::env::var(FAIL_LOAD_ENV).is_ok_and(|names| names.split(',').any(|n| n.trim() == program))
}

/// Where the verbose logs of rejected programs go: `$FATHOM_VERIFIER_LOG_DIR`,
/// else `fathom-verifier` in the temporary directory.
pub fn verifier_log_dir() -> PathBuf {
    std::env::var_os("FATHOM_VERIFIER_LOG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("fathom-verifier"))
}

/// A program the kernel did not load (boxed: errors stay small).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct LoadError(Box<LoadFailure>);

impl std::ops::Deref for LoadError {
    type Target = LoadFailure;

    fn deref(&self) -> &LoadFailure {
        &self.0
    }
}

/// What [`LoadError`] says.
#[derive(Debug, thiserror::Error)]
#[error("{object}/{program}: {reason}{}", log_hint(.log_file))]
pub struct LoadFailure {
    pub object: &'static str,
    pub program: String,
    /// One sentence: why.
    pub reason: String,
    /// The verifier's whole log, when it was written.
    pub log_file: Option<PathBuf>,
    pub stats: Option<VerifierStats>,
    #[source]
    pub source: ProgramError,
}

fn log_hint(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!(" (verifier log: {})", f.display()))
        .unwrap_or_default()
}

/// Loads one program with `load` (the program's own `load` call, on a
/// loader set to [`VerifierLogLevel::STATS`]), returns the verifier's
/// figures (warning when they are over the budget), and turns a rejection
/// into a [`LoadError`].
pub fn load_program(
    object: &'static str,
    program: &str,
    mut load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<Option<VerifierStats>, LoadError> {
    if forced_to_fail(program) {
        return Err(LoadError(Box::new(LoadFailure {
            object,
            program: program.to_string(),
            reason: format!("not loaded: {FAIL_LOAD_ENV} names it (a test of degradation)"),
            log_file: None,
            stats: None,
            source: ProgramError::IOError(std::io::Error::other("load failure forced")),
        })));
    }
    let result = load();
    let log = take_verifier_log().unwrap_or_default();
    let stats = parse_stats(&log);
    let source = match result {
        Ok(()) => {
            if let Some(s) = stats.filter(|s| !s.within_budget()) {
                tracing::warn!(
                    object,
                    program,
                    processed_insns = s.processed_insns,
                    peak_states = s.peak_states,
                    "eBPF program over the verification budget ({BUDGET_PROCESSED_INSNS} insns, \
                     {BUDGET_PEAK_STATES} states): it may be rejected by other kernels"
                );
            }
            return Ok(stats);
        }
        Err(e) => e,
    };
    let (reason, log_file) = match (&source, stats) {
        (_, Some(s)) if s.too_complex() => (
            format!(
                "too complex for this kernel's verifier ({} instructions processed, {} states)",
                s.processed_insns, s.peak_states
            ),
            write_log(object, program, &log),
        ),
        (ProgramError::LoadError { .. }, _) => {
            // Load it again for the verifier's reasons (a rejection for
            // anything but complexity is quick to verify again).
            override_verifier_log_level(Some(VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS));
            let _ = load();
            override_verifier_log_level(None);
            let verbose = take_verifier_log().unwrap_or(log);
            (
                format!("rejected by the kernel: {}", last_words(&verbose, &source)),
                write_log(object, program, &verbose),
            )
        }
        _ => (source.to_string(), None),
    };
    Err(LoadError(Box::new(LoadFailure {
        object,
        program: program.to_string(),
        reason,
        log_file,
        stats,
        source,
    })))
}

/// The verifier's own last complaint: the line just before its statistics,
/// when it is one (not an instruction, a state, or "safe" after a proof that
/// went through: then the kernel refused the program after verifying it,
/// and the error number says why).
fn last_words(log: &str, error: &ProgramError) -> String {
    let before_stats = log
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("verification time") && !l.starts_with("processed "))
        .filter(|l| !l.is_empty())
        .last();
    let complaint = before_stats.filter(|l| {
        let first = l.chars().next().unwrap_or(' ');
        !first.is_ascii_digit()
            && !l.starts_with(';')
            && !l.starts_with("from ")
            && !l.starts_with("mark_precise")
            && !l.contains("safe")
    });
    let errno = match error {
        ProgramError::LoadError { io_error, .. } => io_error.to_string(),
        e => e.to_string(),
    };
    match complaint {
        Some(line) => line.to_string(),
        None => format!("the verifier accepted it, then the load failed: {errno}"),
    }
}

fn write_log(object: &str, program: &str, log: &str) -> Option<PathBuf> {
    if log.is_empty() {
        return None;
    }
    let dir = verifier_log_dir();
    let path = dir.join(format!("{object}-{program}.log"));
    let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, log));
    match written {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "could not write the verifier log");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_statistics_line() {
        let log = "func#0 @0\nverification time 8943599 usec\nstack depth 0+0\n\
                   processed 1000001 insns (limit 1000000) max_states_per_insn 36 \
                   total_states 235416 peak_states 103928 mark_read 50\n";
        let s = parse_stats(log).expect("stats");
        assert_eq!(s.processed_insns, 1_000_001);
        assert_eq!(s.total_states, 235_416);
        assert_eq!(s.peak_states, 103_928);
        assert_eq!(s.verification_time, Duration::from_micros(8_943_599));
        assert!(s.too_complex());
        assert!(!s.within_budget());
    }

    #[test]
    fn a_log_without_statistics_has_none() {
        assert_eq!(parse_stats(""), None);
        assert_eq!(parse_stats("R1 invalid mem access 'scalar'\n"), None);
        assert_eq!(parse_stats("processed many insns\n"), None);
    }
}
