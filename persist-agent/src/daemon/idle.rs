//! When a running service counts as idle, as plain functions of what the
//! supervisor observed, so the policy is unit-tested without a kernel.
//!
//! A service is idle when no SYN came for its idle timeout, it has run that
//! long, nothing is queued on its listener and no connection to its port is
//! established (a client still connected keeps it running). When a park that keeps the state failed (a state that cannot
//! be checkpointed), the next try waits an idle timeout, then twice as long
//! after each further failure, up to [`MAX_KEEP_BACKOFF_DOUBLINGS`] doublings.

use std::time::Duration;

/// Doublings of the wait after failed keep-state parks: at most 64 idle
/// timeouts between tries.
pub const MAX_KEEP_BACKOFF_DOUBLINGS: u32 = 6;

/// What the supervisor knows of a running service when it checks for idleness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Time since the newest SYN for the port (`None`: none ever).
    pub since_syn: Option<Duration>,
    /// Time since the process started or was woken.
    pub running_for: Duration,
    /// The failed keep-state parks in a row, and the time since the last.
    pub keep_failures: Option<(u32, Duration)>,
    /// Connections wait in the listener's accept queue.
    pub queued: bool,
}

/// Whether a service with idle timeout `timeout` that shows `observed` is
/// quiet enough to park. Established connections are checked after this,
/// by [`has_established_connections`], and only when this says yes: that
/// walks `/proc/net/tcp`.
pub fn is_idle(timeout: Duration, observed: &Observed) -> bool {
    observed.since_syn.is_none_or(|since| since >= timeout)
        && observed.running_for >= timeout
        && observed
            .keep_failures
            .is_none_or(|(failures, since)| since >= keep_retry_wait(timeout, failures))
        && !observed.queued
}

/// How long after the `failures`th failed keep-state park in a row the next
/// one is tried.
pub fn keep_retry_wait(timeout: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(MAX_KEEP_BACKOFF_DOUBLINGS);
    timeout.saturating_mul(2u32.pow(doublings))
}

/// How often to look for idleness: a quarter of the timeout, between 50 ms
/// and 1 s (an hour when the service never idles out).
pub fn check_period(timeout: Option<Duration>) -> Duration {
    timeout.map_or(Duration::from_secs(3600), |timeout| {
        (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    })
}

/// Whether any TCP connection to local `port` is established in the
/// calling thread's network namespace.
pub fn has_established_connections(port: u16) -> bool {
    let established = |entries: Vec<procfs::net::TcpNetEntry>| {
        entries.iter().any(|entry| {
            entry.local_address.port() == port && entry.state == procfs::net::TcpState::Established
        })
    };
    procfs::net::tcp().map(established).unwrap_or(false)
        || procfs::net::tcp6().map(established).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn quiet() -> Observed {
        Observed {
            since_syn: Some(10 * SECOND),
            running_for: 10 * SECOND,
            keep_failures: None,
            queued: false,
        }
    }

    #[test]
    fn a_quiet_service_past_its_timeout_is_idle() {
        assert!(is_idle(5 * SECOND, &quiet()));
        let never_syn = Observed {
            since_syn: None,
            ..quiet()
        };
        assert!(
            is_idle(5 * SECOND, &never_syn),
            "no SYN ever counts as quiet"
        );
    }

    #[test]
    fn a_recent_syn_a_fresh_wake_or_a_queue_keeps_it_running() {
        let timeout = 5 * SECOND;
        for (what, observed) in [
            (
                "recent SYN",
                Observed {
                    since_syn: Some(SECOND),
                    ..quiet()
                },
            ),
            (
                "just woken",
                Observed {
                    running_for: SECOND,
                    ..quiet()
                },
            ),
            (
                "queued connection",
                Observed {
                    queued: true,
                    ..quiet()
                },
            ),
        ] {
            assert!(
                !is_idle(timeout, &observed),
                "{what} must not count as idle"
            );
        }
    }

    #[test]
    fn failed_keep_parks_are_retried_after_doubling_waits_up_to_64_timeouts() {
        let timeout = 300 * Duration::from_millis(1);
        let waits: Vec<Duration> = (1..=9).map(|n| keep_retry_wait(timeout, n)).collect();
        assert_eq!(waits[0], timeout);
        assert_eq!(waits[1], timeout * 2);
        assert_eq!(waits[2], timeout * 4);
        assert_eq!(waits[6], timeout * 64);
        assert_eq!(
            waits[8],
            timeout * 64,
            "the wait stops doubling at 64 timeouts"
        );

        let failed_twice = |since| Observed {
            keep_failures: Some((2, since)),
            ..quiet()
        };
        assert!(!is_idle(timeout, &failed_twice(timeout)));
        assert!(is_idle(timeout, &failed_twice(timeout * 2)));
    }

    #[test]
    fn an_absurd_timeout_saturates_instead_of_overflowing() {
        assert_eq!(keep_retry_wait(Duration::MAX, 7), Duration::MAX);
    }

    #[test]
    fn the_check_period_is_a_quarter_of_the_timeout_within_bounds() {
        assert_eq!(check_period(Some(2 * SECOND)), Duration::from_millis(500));
        assert_eq!(
            check_period(Some(Duration::from_millis(100))),
            Duration::from_millis(50)
        );
        assert_eq!(check_period(Some(3600 * SECOND)), SECOND);
        assert_eq!(check_period(None), 3600 * SECOND);
    }
}
