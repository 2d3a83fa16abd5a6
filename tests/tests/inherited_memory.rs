//! Private memory a restored tree shares copy-on-write, as the kernel had it
//! before the checkpoint (issue 13, `restore/inherited_memory.rs`).
//!
//! The fixture (tests/src/bin/fixture-cow.rs) is a parent with one child
//! or two (and perhaps a grandchild under the first), sharing a private
//! anonymous region and a private file mapping through the forks, with
//! pages each of them wrote since. Its processes
//! check every byte of both from inside once restored; the test compares
//! what /proc/PID/smaps says of both regions with what it said of the
//! processes before the checkpoint. gunicorn's arbiter and workers are
//! parked and woken by the daemon, in its own network namespace. Each test
//! has its own temporary directory and kills only the processes it started,
//! by pid.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use persist_tests::{
    Sandbox, binary, gunicorn_command, has_unfilled_memory, require_root, result_of, results_of,
    wait_until,
};
use persist_tests::{own_pid, restored_root, service_pids, stderr, tree_of, wsgi_answering};

/// kB of a page, as smaps counts.
const PAGE_KB: u64 = 4;
/// Anonymous pages the one child and its parent share after the fork: of
/// the 48 written before it, all but page 1 (the parent wrote it since)
/// and page 2 (the child did).
const SHARED_WITH_ONE_CHILD: u64 = 46;

/// The smaps fields of the anonymous region compared before and after: the
/// pages mapped, their proportional share (per mapping, smaps has `Pss`
/// only: all of it anonymous here), the dirty pages others map too, and
/// those no other does.
const ANON_FIELDS: [&str; 4] = ["Anonymous", "Pss", "Shared_Dirty", "Private_Dirty"];
/// The same of the private file mapping, but its proportional share: the
/// checks read the file's pages (clean page cache, mapped by both) in the
/// restored processes only.
const FILE_FIELDS: [&str; 3] = ["Anonymous", "Shared_Dirty", "Private_Dirty"];

/// The fixture's processes, the parent first; every one killed on drop.
struct CowFixture {
    parent: Child,
    /// Its children, then the grandchild if any.
    children: Vec<i32>,
    /// The file each process writes its result in, the parent's first.
    results: Vec<&'static str>,
    /// The private anonymous region's address.
    anon: u64,
    /// The private file mapping's address.
    file: u64,
    dir: tempfile::TempDir,
}

impl CowFixture {
    /// The fixture with `children` (1 or 2), and a grandchild under the
    /// first if `grandchild`.
    fn start(children: usize, grandchild: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let parent = Command::new(binary("fixture-cow"))
            .arg(dir.path())
            .arg(children.to_string())
            .args(grandchild.then_some("grandchild"))
            .spawn()
            .expect("spawn fixture-cow");
        let mut results = vec!["parent-result", "child-result", "child2-result"];
        results.truncate(1 + children);
        if grandchild {
            results.push("grandchild-result");
        }
        let text = persist_tests::ready_text(dir.path(), "fixture-cow");
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(fields.len(), 2 + results.len(), "ready holds {text:?}");
        let address = |field: &str| u64::from_str_radix(field, 16).expect("a hex address");
        Self {
            anon: address(fields[1]),
            file: address(fields[2]),
            children: fields[3..]
                .iter()
                .map(|pid| pid.parse().expect("a pid"))
                .collect(),
            results,
            parent,
            dir,
        }
    }

    fn pids(&self) -> Vec<i32> {
        std::iter::once(self.parent.id() as i32)
            .chain(self.children.iter().copied())
            .collect()
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image")
    }

    /// Has every process check its memory from inside: `pids` are the
    /// parent's and its descendants', in the fixture's order.
    fn results(&self, pids: &[i32]) -> Vec<String> {
        let dir = self.dir.path();
        let (child, parent) = results_of(dir, pids[0], pids[1]);
        let mut results = vec![parent, child];
        for (&pid, name) in pids.iter().zip(&self.results).skip(2) {
            results.push(result_of(dir, pid, name));
        }
        results
    }

    /// The smaps fields of both regions of each process of `pids`.
    fn usage(&self, pids: &[i32]) -> Vec<RegionUsage> {
        pids.iter()
            .map(|&pid| RegionUsage {
                anon: smaps_of(pid, self.anon, &ANON_FIELDS),
                file: smaps_of(pid, self.file, &FILE_FIELDS),
            })
            .collect()
    }
}

impl Drop for CowFixture {
    fn drop(&mut self) {
        for &pid in &self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.parent.kill();
        let _ = self.parent.wait();
    }
}

/// What smaps says of each process of the tree, in the fixture's order.
type Usage = Vec<RegionUsage>;

/// What smaps says of a process's two regions (fields in kB).
#[derive(Debug, PartialEq, Eq)]
struct RegionUsage {
    anon: HashMap<String, u64>,
    file: HashMap<String, u64>,
}

/// The `fields` of the smaps entry of `pid` starting at `address`, in kB;
/// each of them must be there.
fn smaps_of(pid: i32, address: u64, fields: &[&str]) -> HashMap<String, u64> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/smaps: {e}"));
    let header = format!("{address:x}-");
    let mut lines = smaps.lines().skip_while(|line| !line.starts_with(&header));
    assert!(
        lines.next().is_some(),
        "pid {pid} has no mapping at {address:#x}"
    );
    let found: HashMap<String, u64> = lines
        .take_while(|line| !line.starts_with("VmFlags"))
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            let kb = value.trim().strip_suffix(" kB")?.parse().ok()?;
            fields.contains(&name).then(|| (name.to_owned(), kb))
        })
        .collect();
    assert_eq!(
        found.len(),
        fields.len(),
        "pid {pid}'s smaps entry at {address:#x} lacks some of {fields:?}: {found:?}"
    );
    found
}

/// The field `name` summed over `usage`'s anonymous regions.
fn anon_total(usage: &[RegionUsage], name: &str) -> u64 {
    usage.iter().map(|u| u.anon[name]).sum()
}

/// `checkpoint --tree` of the tree of `root` into `image` (which kills
/// it), which must succeed.
fn checkpoint_tree(root: i32, image: &Path, what: &str) {
    let output = agent(&[
        "checkpoint",
        "--tree",
        "--pid",
        &root.to_string(),
        "--image",
        image.to_str().expect("UTF-8 path"),
    ]);
    assert!(
        output.status.success(),
        "checkpoint --tree of {what} (pid {root}): {}",
        stderr(&output)
    );
}

fn agent(args: &[&str]) -> Output {
    Command::new(binary("persist-agent"))
        .args(args)
        .output()
        .expect("run persist-agent")
}

fn wait_gone(pids: &[i32]) {
    let gone = wait_until(Duration::from_secs(20), || {
        pids.iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
    assert!(gone.is_ok(), "the processes {pids:?} are not gone");
}

/// A restored tree, its processes in the fixture's order (as this test
/// sees their pids); killed on drop.
struct Restored {
    pids: Vec<i32>,
}

impl Restored {
    /// Restores `image` of `recorded` (the fixture's pids).
    fn restore(image: &Path, recorded: &[i32], round: &str) -> Self {
        let output = agent(&["restore", "--image", image.to_str().expect("UTF-8 path")]);
        let root = restored_root(&output, &format!("{round} restore"));
        let tree = tree_of(root);
        // Killed on drop from here on, whatever fails.
        let mut restored = Self { pids: tree.clone() };
        assert_eq!(
            tree.len(),
            recorded.len(),
            "{round} restore: the tree is {tree:?}"
        );
        restored.pids = recorded
            .iter()
            .map(|&pid| {
                tree.iter()
                    .copied()
                    .find(|&process| own_pid(process) == pid)
                    .unwrap_or_else(|| {
                        panic!("{round} restore: no process of {tree:?} has recorded pid {pid}")
                    })
            })
            .collect();
        restored
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        for &pid in self.pids.iter().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Starts the fixture with `children` and perhaps a `grandchild`, notes
/// what smaps says of it, checkpoints it (`--tree`, which kills it), and
/// restores it twice in turn, then a third time checkpointing the restored
/// tree again (once its processes checked their memory) and restoring that
/// image: each time every process finds every byte it had in both regions.
/// Returns what smaps said before the checkpoint, and after each restore
/// (once the checks are done).
fn restore_three_times(children: usize, grandchild: bool) -> (Usage, Vec<(&'static str, Usage)>) {
    let mut fixture = CowFixture::start(children, grandchild);
    let recorded = fixture.pids();
    let before = fixture.usage(&recorded);
    let image = fixture.image();
    checkpoint_tree(recorded[0], &image, "the fixture");
    let _ = fixture.parent.wait();
    wait_gone(&recorded);

    let mut rounds = Vec::new();
    for round in ["first", "second", "checkpointed again"] {
        let mut restored = Restored::restore(&image, &recorded, round);
        if round == "checkpointed again" {
            // The restored tree, its shared pages shared again, checks its
            // memory (its heap grows), and is checkpointed in turn once its
            // pagers are done, and that image restored.
            for (index, result) in fixture.results(&restored.pids).iter().enumerate() {
                assert_eq!(
                    result, "OK",
                    "restore before checkpointing again: process {index} (pid {}) of the tree",
                    restored.pids[index]
                );
            }
            let all_in = wait_until(Duration::from_secs(30), || {
                !restored.pids.iter().any(|&pid| has_unfilled_memory(pid))
            });
            assert!(all_in.is_ok(), "the restored tree's memory is not all in");
            let again = fixture.dir.path().join("again");
            checkpoint_tree(restored.pids[0], &again, "the restored tree");
            let pids = std::mem::take(&mut restored.pids);
            wait_gone(&pids);
            restored = Restored::restore(&again, &recorded, round);
        }
        // Every process reads every page of both regions: all it maps is
        // in once the checks are done.
        for (index, result) in fixture.results(&restored.pids).iter().enumerate() {
            assert_eq!(
                result, "OK",
                "{round} restore: process {index} (pid {}) of the tree",
                restored.pids[index]
            );
        }
        rounds.push((round, fixture.usage(&restored.pids)));
        let pids = restored.pids.clone();
        drop(restored);
        wait_gone(&pids);
    }
    (before, rounds)
}

/// Restores the fixture with `children` three times (as
/// [`restore_three_times`]) and checks that smaps says of each process
/// after each restore what it said before the checkpoint: the pages shared
/// are shared again, by the same processes, counted once in their
/// proportional share. Returns what smaps said before the checkpoint.
fn restore_three_times_and_compare(children: usize) -> Usage {
    let (before, rounds) = restore_three_times(children, false);
    for (round, after) in rounds {
        for (index, (before, after)) in before.iter().zip(&after).enumerate() {
            assert_eq!(
                after, before,
                "{round} restore: smaps of process {index} of the tree: \
                 after the restore, then before the checkpoint"
            );
        }
    }
    before
}

/// One child: the 46 anonymous pages it did not write and its parent did
/// not either are shared again after each restore (Shared_Dirty in both,
/// counted half in each one's Pss), and so is the first page of the
/// private file mapping, which the parent wrote before the fork; the pages
/// each wrote since are its own, the page the parent first wrote after the
/// fork is zeros in the child, and the file page the parent wrote after the
/// fork is the file's in the child.
#[test]
fn private_memory_a_child_shares_with_its_parent_is_restored_shared_again() {
    require_root!();
    let before = restore_three_times_and_compare(1);
    // What the comparison relied on: the fixture shares what it says.
    for usage in &before {
        assert_eq!(
            usage.anon["Shared_Dirty"],
            SHARED_WITH_ONE_CHILD * PAGE_KB,
            "the anonymous region's shared pages before the checkpoint: {before:?}"
        );
    }
    // Shared pages are counted once in the tree's Pss (half in each
    // process): the tree maps each twice, 4 kB more than its Pss.
    let mapped = anon_total(&before, "Anonymous");
    let proportional = anon_total(&before, "Pss");
    assert_eq!(
        mapped - proportional,
        SHARED_WITH_ONE_CHILD * PAGE_KB,
        "the tree's anonymous pages mapped, then in proportion: {before:?}"
    );
    // The file mapping's page 0, written before the fork, shared; pages 1
    // and 2 the parent's own, page 1 the child's.
    let file: Vec<(u64, u64)> = before
        .iter()
        .map(|usage| (usage.file["Shared_Dirty"], usage.file["Private_Dirty"]))
        .collect();
    assert_eq!(
        file,
        vec![(PAGE_KB, 2 * PAGE_KB), (PAGE_KB, PAGE_KB)],
        "the private file mapping's shared and own pages: {before:?}"
    );
}

/// Two children sharing different pages with their parent: each one's
/// page the other shares is staged once and dropped from the one that has
/// its own or none (anonymous pages 1 and 2 and file page 1 of the first
/// child; anonymous pages 3 and 47, the latter none, and file page 0, the
/// file's, of the second), which then gets its own version: its check
/// finds it, and the pages stay as shared as before.
#[test]
fn pages_staged_for_one_child_are_the_others_own_after_restore() {
    require_root!();
    let before = restore_three_times_and_compare(2);
    // What the comparison relied on. The parent shares its anonymous
    // pages 0 and 4..47 with both children, pages 1 and 2 with the second
    // (it wrote page 1 between the forks), pages 3 and 47 with the first.
    // Of the file, it shares page 0 with the first child, page 1 with the
    // second.
    let shared: Vec<(u64, u64)> = before
        .iter()
        .map(|usage| (usage.anon["Shared_Dirty"], usage.file["Shared_Dirty"]))
        .collect();
    assert_eq!(
        shared,
        vec![
            (48 * PAGE_KB, 2 * PAGE_KB),
            (46 * PAGE_KB, PAGE_KB),
            (46 * PAGE_KB, PAGE_KB)
        ],
        "the pages shared before the checkpoint: {before:?}"
    );
}

/// A grandchild, forked by the first child once it wrote its pages, which
/// then wrote one more: every process of the three generations finds every
/// byte it had, each time. The middle process stages its own copy of what
/// it shares with the grandchild (`restore/inherited_memory.rs`), so the
/// pages the three share before the checkpoint are shared by the child and
/// the grandchild only after a restore, and the parent keeps its own copy.
#[test]
fn a_grandchild_finds_its_memory_and_shares_what_it_shared_with_its_parent() {
    require_root!();
    let (before, rounds) = restore_three_times(1, true);
    // Before the checkpoint, the grandchild shares all its pages of the
    // 48 written before the forks but page 4 (it wrote its own).
    assert_eq!(
        before[2].anon["Shared_Dirty"],
        47 * PAGE_KB,
        "the grandchild's shared pages before the checkpoint: {before:?}"
    );
    for (round, after) in rounds {
        // After: all of those it shares with the first child, whose page 5
        // (written after the grandchild's fork) it no longer shares with
        // the parent.
        let [parent, child, grandchild] = &after[..] else {
            panic!("{round} restore: three processes, not {after:?}");
        };
        assert_eq!(
            (child.anon["Shared_Dirty"], grandchild.anon["Shared_Dirty"]),
            (46 * PAGE_KB, 46 * PAGE_KB),
            "{round} restore: the pages the child and the grandchild share: {after:?}"
        );
        assert_eq!(
            parent.anon["Anonymous"], before[0].anon["Anonymous"],
            "{round} restore: the parent's pages: {after:?}"
        );
    }
}

/// The pids of `name`'s tree of `processes` once it runs (the root first).
fn running_tree(sandbox: &Sandbox, name: &str, processes: usize) -> Vec<i32> {
    let mut seen = Vec::new();
    let running = wait_until(Duration::from_secs(20), || {
        let Ok(status) = sandbox.service(name) else {
            return false;
        };
        seen = service_pids(&status);
        status["state"] == "running" && seen.len() == processes
    });
    assert!(
        running.is_ok(),
        "{name} never ran as {processes} processes: {:?}\n{}",
        sandbox.service(name),
        sandbox.daemon_log()
    );
    seen
}

/// `Anonymous` and `Pss_Anon` of /proc/PID/smaps_rollup summed over `pids`,
/// in kB.
fn anonymous_and_pss(pids: &[i32]) -> (u64, u64) {
    let mut sums = (0, 0);
    for pid in pids {
        let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/smaps_rollup: {e}"));
        for line in rollup.lines() {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let kb: u64 = value
                .trim()
                .strip_suffix(" kB")
                .and_then(|kb| kb.parse().ok())
                .unwrap_or(0);
            match name {
                "Anonymous" => sums.0 += kb,
                "Pss_Anon" => sums.1 += kb,
                _ => {}
            }
        }
    }
    sums
}

/// gunicorn's arbiter and two sync workers under the daemon: after each
/// wake, once their pagers are done, the workers share most of their
/// private memory with the arbiter again, as they did when they were
/// forked (each restored with its own copy, the tree's Pss_Anon was its
/// Anonymous: nothing shared).
#[test]
fn a_woken_gunicorn_tree_shares_its_arbiters_memory() {
    require_root!();
    const PORT: u16 = 8163;
    const BODY: &str = "hello from shared memory\n";
    let sandbox = Sandbox::with_daemon().expect("a daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let command = gunicorn_command(dir.path(), PORT, &wsgi_answering(BODY), &[]);
    sandbox
        .add_ok("gunicorn", PORT, &["--ready", "http:/"], &command)
        .expect("add gunicorn");
    for wake in ["first", "second"] {
        assert_eq!(sandbox.http_get(PORT).expect("a request wakes it"), BODY);
        let pids = running_tree(&sandbox, "gunicorn", 3);
        let all_in = wait_until(Duration::from_secs(30), || {
            !pids.iter().any(|&pid| has_unfilled_memory(pid))
        });
        assert!(
            all_in.is_ok(),
            "{wake} wake: the tree's memory is not all in"
        );
        let (anonymous, pss) = anonymous_and_pss(&pids);
        // Measured: about 43% (each page the three share counts a third
        // in each).
        assert!(
            pss * 4 < anonymous * 3,
            "{wake} wake: the tree's Pss_Anon is {pss} kB of {anonymous} kB anonymous"
        );
        sandbox.agent_ok(&["park", "gunicorn"]).expect("park");
    }
}
