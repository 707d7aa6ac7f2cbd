//! What `chirp up` does when a part of the mesh dies on its own: the
//! restart policy, the backoff between attempts and the limit after which it
//! gives up, and how a death is told to people.
//!
//! The numbers are chosen for a local mesh: the first attempt comes quickly
//! (a store killed by the OOM killer is usually fine to start at once),
//! doubling waits keep a part that cannot start from burning a CPU, and five
//! failures in a row, about eight seconds, are enough to tell a crash loop
//! from bad luck. A part that then stays up for a while has earned a fresh
//! count.

use std::{os::unix::process::ExitStatusExt as _, process::ExitStatus, time::Duration};

use serde::{Deserialize, Serialize};

/// First wait before starting a dead part again; doubled on each failure in
/// a row.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Attempts in a row after which a part is left down.
pub const MAX_RESTARTS: u32 = 5;
/// A run at least this long resets the count of failures in a row.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// `chirp up --restart`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Policy {
    /// A part that dies on its own is started again, with backoff.
    #[default]
    OnFailure,
    /// A part that dies stays down until `chirp chaos start` (for
    /// demonstrating an outage).
    Never,
}

/// How a process ended, as people say it.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => match signal_name(signal) {
            Some(name) => format!("signal {signal} ({name})"),
            None => format!("signal {signal}"),
        },
        (None, None) => status.to_string(),
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(signal).ok().map(|s| s.as_str())
}

/// Wait before attempt `n` (1-based) of a run of failures.
pub fn backoff(attempt: u32) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF)
}

/// The last time a part ended without being asked to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Death {
    /// `exit code 1`, `signal 9 (SIGKILL)`, or why it could not start.
    pub cause: String,
    /// RFC 3339, UTC.
    pub at: String,
}

impl Death {
    pub fn now(cause: String) -> Self {
        Self {
            cause,
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_quarter_second_up_to_its_cap() {
        let waits: Vec<_> = (1..=7).map(backoff).collect();
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 8000, 8000].map(Duration::from_millis)
        );
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_death_by_signal_is_told_with_the_signal_name() {
        assert_eq!(describe(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exit code 1");
    }
}
