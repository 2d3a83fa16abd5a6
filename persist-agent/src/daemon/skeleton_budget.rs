//! Tiers of parking: which parked snapshot services keep a prepared
//! skeleton (the fastest wake, at its memory cost) and which only their
//! image on disk (no memory; a cold wake prepares the skeleton on the SYN).
//!
//! The policy (docs/parked-cost.md, Tiers) is a plain function of what the
//! daemon observes, [`decide`]; [`enforce`] applies it every
//! [`ENFORCE_PERIOD`] or so through each service's supervisor, which acts
//! only on a parked service. A skeleton's cost is what releasing it gives
//! back: the private memory, page tables and kernel objects of the skeleton
//! (and of the init of its pid namespace), not the port keeper nor the
//! agent's share, which a parked service costs with or without one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

use super::Registry;
use super::parked_cost::parked_cost;
use crate::service::KeepSkeleton;

/// How often the budget is enforced, at most.
pub const ENFORCE_PERIOD: Duration = Duration::from_millis(500);

/// How many times as long as its last pass the budget waits for its next.
const QUIET_FACTOR: u32 = 200;

/// The longest wait between two passes: a first pass measures every
/// skeleton's cost, which the next ones do not.
const LONGEST_WAIT: Duration = Duration::from_secs(5);

/// A parked snapshot-mode service, as the budget sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The service.
    pub name: String,
    /// Its `keep_skeleton` setting.
    pub keep: KeepSkeleton,
    /// The cost of its prepared skeleton, when it has one.
    pub held_bytes: Option<u64>,
    /// The cost its last skeleton had, if one was measured.
    pub last_bytes: Option<u64>,
    /// When it was last woken (`None`: never since the daemon started).
    pub last_woken: Option<Instant>,
    /// Whether a skeleton could be prepared now: parked, none on its way,
    /// its last prepare did not fail.
    pub can_prepare: bool,
}

/// What the budget asks of one service's supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Kill the prepared skeleton; the image stays.
    Release,
    /// Prepare a skeleton from the image.
    Prepare,
}

/// The orders that bring the skeletons held within `budget` bytes (`None`:
/// no limit): `never` skeletons released; over budget, `auto` ones released
/// least recently woken first; under it, `auto` services without one get
/// one again, most recently woken first, while their last cost fits.
/// `always` skeletons are never released, and count against the budget.
pub fn decide(budget: Option<u64>, candidates: &[Candidate]) -> Vec<(String, Order)> {
    let mut orders = Vec::new();
    let mut held: u64 = 0;
    for candidate in candidates {
        match (candidate.keep, candidate.held_bytes) {
            (KeepSkeleton::Never, Some(_)) => {
                orders.push((candidate.name.clone(), Order::Release));
            }
            (_, Some(bytes)) => held += bytes,
            _ => {}
        }
    }
    // Only the `auto` services a pass acts on are sorted: with thousands
    // parked, this runs every period.
    let auto = |wanted: fn(&Candidate) -> bool| -> Vec<&Candidate> {
        candidates
            .iter()
            .filter(|c| c.keep == KeepSkeleton::Auto && wanted(c))
            .collect()
    };
    let preparable = |c: &Candidate| c.held_bytes.is_none() && c.can_prepare;
    let Some(budget) = budget else {
        let mut waiting = auto(preparable);
        waiting.sort_by(least_recently_woken_first);
        orders.extend(
            waiting
                .into_iter()
                .map(|c| (c.name.clone(), Order::Prepare)),
        );
        return orders;
    };
    if held > budget {
        let mut holding = auto(|c| c.held_bytes.is_some());
        holding.sort_by(least_recently_woken_first);
        for candidate in holding {
            if held <= budget {
                break;
            }
            held -= candidate.held_bytes.unwrap_or(0);
            orders.push((candidate.name.clone(), Order::Release));
        }
        if held > budget {
            return orders;
        }
    }
    // A service never measured is taken to cost what the others do.
    let measured: Vec<u64> = candidates.iter().filter_map(|c| c.last_bytes).collect();
    let typical =
        (!measured.is_empty()).then(|| measured.iter().sum::<u64>() / measured.len() as u64);
    // Those whose cost fits what is left, with their cost.
    let room = budget - held;
    let mut waiting: Vec<(&Candidate, u64)> = auto(preparable)
        .into_iter()
        .filter_map(|c| {
            let bytes = c.last_bytes.or(typical)?;
            (bytes <= room).then_some((c, bytes))
        })
        .collect();
    // Most recently woken first.
    waiting.sort_by(|(a, _), (b, _)| {
        b.last_woken
            .cmp(&a.last_woken)
            .then_with(|| a.name.cmp(&b.name))
    });
    for (candidate, bytes) in waiting {
        if held + bytes <= budget {
            held += bytes;
            orders.push((candidate.name.clone(), Order::Prepare));
        }
    }
    orders
}

/// Least recently woken first; never woken before any woken one; by name
/// among equals, so that a decision does not flap.
fn least_recently_woken_first(a: &&Candidate, b: &&Candidate) -> std::cmp::Ordering {
    a.last_woken
        .cmp(&b.last_woken)
        .then_with(|| a.name.cmp(&b.name))
}

/// The cost of each skeleton, measured once: a stopped skeleton does not
/// grow, and reading /proc for every skeleton each period would cost the
/// host what the budget saves.
#[derive(Debug, Default)]
pub struct SkeletonCosts {
    by_pid: Mutex<HashMap<i32, u64>>,
}

impl SkeletonCosts {
    /// The cost of the skeleton `pid` (with `init_pid`, the init of its pid
    /// namespace).
    pub fn of(&self, pid: i32, init_pid: Option<i32>) -> u64 {
        let cached = self.by_pid.lock().expect("costs lock").get(&pid).copied();
        cached.unwrap_or_else(|| {
            let mut roots = vec![pid];
            roots.extend(init_pid);
            let bytes = parked_cost(&roots, 0).total();
            self.by_pid.lock().expect("costs lock").insert(pid, bytes);
            bytes
        })
    }

    /// Forgets the skeletons that are not in `live` any more (their pids
    /// may be reused).
    pub fn keep_only(&self, live: &HashSet<i32>) {
        self.by_pid
            .lock()
            .expect("costs lock")
            .retain(|pid, _| live.contains(pid));
    }
}

/// Applies [`decide`] to the registry, for as long as the daemon runs;
/// nothing to do without a budget.
///
/// A pass looks at every service: it comes [`ENFORCE_PERIOD`] after the
/// last, or [`QUIET_FACTOR`] times as long as the last took if that is
/// longer (at most [`LONGEST_WAIT`]), so that with thousands of services
/// the budget takes no more than about 0.5 % of a CPU from the wakes.
pub async fn enforce(registry: Arc<Registry>) {
    let Some(budget) = registry.skeleton_budget() else {
        return;
    };
    info!(budget_bytes = budget, "skeleton budget");
    loop {
        let started = Instant::now();
        let registry = registry.clone();
        // /proc is read for new skeletons: off the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            let candidates = registry.skeleton_candidates();
            for (name, order) in decide(Some(budget), &candidates) {
                info!(service = %name, ?order, "skeleton budget");
                registry.order_skeleton(&name, order);
            }
        })
        .await;
        let took = started.elapsed();
        let wait = (took * QUIET_FACTOR).clamp(ENFORCE_PERIOD, LONGEST_WAIT);
        tokio::time::sleep(wait.saturating_sub(took)).await;
    }
}

/// Parses a size such as `64MiB`, `512KiB`, `1G` or `1048576` (bytes):
/// binary units, with or without the `iB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 64MiB, 512KiB or 1GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use KiB, MiB, GiB or TiB"
            ));
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(
        name: &str,
        keep: KeepSkeleton,
        held: Option<u64>,
        woken: Option<u64>,
    ) -> Candidate {
        let base = Instant::now();
        Candidate {
            name: name.into(),
            keep,
            held_bytes: held,
            last_bytes: held,
            last_woken: woken.map(|s| base + Duration::from_secs(s)),
            can_prepare: held.is_none(),
        }
    }

    #[test]
    fn over_budget_the_least_recently_woken_auto_skeletons_go_first() {
        let candidates = [
            candidate("old", KeepSkeleton::Auto, Some(100), Some(1)),
            candidate("new", KeepSkeleton::Auto, Some(100), Some(3)),
            candidate("never-woken", KeepSkeleton::Auto, Some(100), None),
            candidate("pinned", KeepSkeleton::Always, Some(100), None),
        ];
        let orders = decide(Some(250), &candidates);
        assert_eq!(
            orders,
            [
                ("never-woken".to_owned(), Order::Release),
                ("old".to_owned(), Order::Release)
            ]
        );
        // Even a budget the `always` one alone exceeds keeps it.
        let orders = decide(Some(10), &candidates);
        assert_eq!(orders.len(), 3);
        assert!(!orders.iter().any(|(name, _)| name == "pinned"));
        assert!(decide(None, &candidates).is_empty());
        assert!(decide(Some(400), &candidates).is_empty());
    }

    #[test]
    fn under_budget_the_most_recently_woken_get_a_skeleton_again() {
        let mut old = candidate("old", KeepSkeleton::Auto, None, Some(1));
        old.last_bytes = Some(100);
        let mut new = candidate("new", KeepSkeleton::Auto, None, Some(3));
        new.last_bytes = Some(100);
        let held = candidate("held", KeepSkeleton::Auto, Some(100), Some(2));
        let candidates = [old, new, held];
        assert_eq!(
            decide(Some(250), &candidates),
            [("new".to_owned(), Order::Prepare)]
        );
        assert_eq!(decide(Some(300), &candidates).len(), 2);
        assert!(decide(Some(150), &candidates).is_empty());
        assert_eq!(decide(None, &candidates).len(), 2);
    }

    #[test]
    fn never_skeletons_are_released_and_never_prepared() {
        let candidates = [
            candidate("cold", KeepSkeleton::Never, Some(100), Some(1)),
            candidate("cold-parked", KeepSkeleton::Never, None, Some(1)),
        ];
        assert_eq!(
            decide(None, &candidates),
            [("cold".to_owned(), Order::Release)]
        );
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("MiB").is_err());
        assert!(
            parse_size("3 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_size("99999999999TiB")
                .unwrap_err()
                .contains("too large")
        );
    }
}
