//! The process's open-files limit, raised at start and sized against what the agent needs.
//!
//! Containers and many init systems start processes with a soft limit of 1,024 open files
//! while the hard limit is far higher. An agent needs one descriptor per VIP listener (per
//! port of every endpoint in the clusterset), up to two per flow (the client's connection and,
//! where the endpoint is local, the server's) and a few dozen of its own, so a site of a
//! thousand endpoints or a grid with a thousand open connections runs out at 1,024: accepts
//! fail, listeners go missing and probes stop answering. [`raise_open_files`] lifts the soft
//! limit to the hard one, as `getrlimit(2)`/`setrlimit(2)` allow any unprivileged process to,
//! and [`OpenFiles::shortfall`] says how far the result still falls short of a configuration.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors the agent holds apart from listeners and flows: the QUIC and DNS sockets, the
/// admin and metrics listeners and their clients, the log, the runtime's own.
pub const BASE_DESCRIPTORS: u64 = 128;

/// The open-files limit the agent runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenFiles {
    /// The soft limit now in force (descriptors); `u64::MAX` for unlimited.
    pub soft: u64,
    /// The hard limit (descriptors); `u64::MAX` for unlimited.
    pub hard: u64,
    /// The soft limit before [`raise_open_files`] raised it, if it did.
    pub raised_from: Option<u64>,
}

impl OpenFiles {
    /// Descriptors needed for `max_flows` concurrent flows (two each at most) plus
    /// [`BASE_DESCRIPTORS`]; VIP listeners come on top, one per VIP and port.
    pub fn needed(max_flows: usize, listeners: usize) -> u64 {
        BASE_DESCRIPTORS + 2 * max_flows as u64 + listeners as u64
    }

    /// How many descriptors short of [`OpenFiles::needed`] the soft limit is, if it is.
    pub fn shortfall(&self, max_flows: usize, listeners: usize) -> Option<u64> {
        Self::needed(max_flows, listeners)
            .checked_sub(self.soft)
            .filter(|short| *short > 0)
    }
}

/// Errors reading or raising the limit.
#[derive(Debug, thiserror::Error)]
#[error("RLIMIT_NOFILE: {0}")]
pub struct RlimitError(#[from] rustix::io::Errno);

/// Raises the soft open-files limit (`RLIMIT_NOFILE`) to the hard limit and returns both.
///
/// # Errors
/// [`RlimitError`] when `setrlimit(2)` refuses (it does not for soft ≤ hard).
pub fn raise_open_files() -> Result<OpenFiles, RlimitError> {
    let now = getrlimit(Resource::Nofile);
    let (soft, hard) = (now.current, now.maximum);
    if soft >= hard || soft.is_none() {
        return Ok(OpenFiles {
            soft: soft.unwrap_or(u64::MAX),
            hard: hard.unwrap_or(u64::MAX),
            raised_from: None,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: hard,
            maximum: hard,
        },
    )?;
    let after = getrlimit(Resource::Nofile);
    Ok(OpenFiles {
        soft: after.current.unwrap_or(u64::MAX),
        hard: after.maximum.unwrap_or(u64::MAX),
        raised_from: soft,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit_and_is_idempotent() {
        let first = raise_open_files().unwrap();
        assert_eq!(first.soft, first.hard);
        let again = raise_open_files().unwrap();
        assert_eq!(again.soft, first.soft);
        assert_eq!(again.raised_from, None);
    }

    #[test]
    fn shortfall_counts_two_descriptors_per_flow_and_one_per_listener() {
        let limit = OpenFiles {
            soft: 1024,
            hard: 1024,
            raised_from: None,
        };
        assert_eq!(OpenFiles::needed(4096, 1492), 128 + 8192 + 1492);
        assert_eq!(limit.shortfall(4096, 1492), Some(128 + 8192 + 1492 - 1024));
        assert_eq!(limit.shortfall(100, 100), None);
        let unlimited = OpenFiles {
            soft: u64::MAX,
            ..limit
        };
        assert_eq!(unlimited.shortfall(usize::MAX / 4, 0), None);
    }
}
