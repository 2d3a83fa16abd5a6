//! What a service's exit means, as a plain function of what was observed:
//! park it until the next SYN, or show it failed.
//!
//! An exit the wake itself caused (the restored process killed by its pager
//! on a corrupt page, say) fails the service with that reason. A process
//! that exits within [`QUICK_EXIT`] of its start, [`QUICK_EXITS_TO_FAIL`]
//! times in a row, fails it too: waking it again would only repeat that.
//! Any other exit parks it.

use std::time::Duration;

/// A process that exits this soon after its start counts as a failed start.
pub const QUICK_EXIT: Duration = Duration::from_secs(1);

/// Quick exits in a row that mark the service failed.
pub const QUICK_EXITS_TO_FAIL: u32 = 3;

/// What to do once the service's process has exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterExit {
    /// Park it: the next SYN wakes it again.
    Park,
    /// Show it failed, with this reason.
    Fail(String),
}

/// The quick exits seen in a row.
#[derive(Debug, Default)]
pub struct ExitHistory {
    quick_exits: u32,
}

impl ExitHistory {
    /// Records an exit after `ran_for`, `wake_failure` being the wake's own
    /// fault if there was one, and says what to do.
    pub fn after_exit(&mut self, ran_for: Duration, wake_failure: Option<String>) -> AfterExit {
        if let Some(err) = wake_failure {
            self.quick_exits = 0;
            return AfterExit::Fail(err);
        }
        if ran_for >= QUICK_EXIT {
            self.quick_exits = 0;
            return AfterExit::Park;
        }
        self.quick_exits += 1;
        if self.quick_exits < QUICK_EXITS_TO_FAIL {
            return AfterExit::Park;
        }
        self.quick_exits = 0;
        AfterExit::Fail(format!(
            "exited within {QUICK_EXIT:?} of each of its last {QUICK_EXITS_TO_FAIL} starts"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_millis(10);
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn a_service_that_ran_a_while_is_parked_however_often_it_exits() {
        let mut history = ExitHistory::default();
        for _ in 0..10 {
            assert_eq!(history.after_exit(LONG, None), AfterExit::Park);
        }
    }

    #[test]
    fn three_quick_exits_in_a_row_fail_it_and_start_the_count_over() {
        let mut history = ExitHistory::default();
        assert_eq!(history.after_exit(QUICK, None), AfterExit::Park);
        assert_eq!(history.after_exit(QUICK, None), AfterExit::Park);
        let AfterExit::Fail(reason) = history.after_exit(QUICK, None) else {
            panic!("the third quick exit in a row fails the service");
        };
        assert_eq!(reason, "exited within 1s of each of its last 3 starts");
        assert_eq!(
            history.after_exit(QUICK, None),
            AfterExit::Park,
            "counted afresh"
        );
    }

    #[test]
    fn a_long_run_in_between_resets_the_count() {
        let mut history = ExitHistory::default();
        history.after_exit(QUICK, None);
        history.after_exit(QUICK, None);
        history.after_exit(LONG, None);
        assert_eq!(history.after_exit(QUICK, None), AfterExit::Park);
        assert_eq!(history.after_exit(QUICK, None), AfterExit::Park);
    }

    #[test]
    fn a_wake_failure_fails_it_at_once_with_its_reason() {
        let mut history = ExitHistory::default();
        history.after_exit(QUICK, None);
        assert_eq!(
            history.after_exit(LONG, Some("page 0x1000: checksum".into())),
            AfterExit::Fail("page 0x1000: checksum".into())
        );
        assert_eq!(
            history.after_exit(QUICK, None),
            AfterExit::Park,
            "the count was reset"
        );
    }
}
