//! What a parked service costs the host, as `status`, the metrics and the
//! bench report it: not only the private memory of its prepared skeleton,
//! but everything the kernel keeps for the processes that wait for its
//! wake, and a share of the agent.
//!
//! Per process (the skeleton, its children and the init of its pid
//! namespace, and a port keeper of the service alone, as earlier agents ran):
//! - private memory: anonymous pages in proportion (`Pss_Anon`: a tree's
//!   processes share the memory their children inherited, which counts
//!   once across them), and the pages of every
//!   shared memory object its processes map (a memfd, `MAP_SHARED`
//!   anonymous memory, System V and POSIX shared memory), each object
//!   counted once, resident or not: a skeleton's objects are filled when it
//!   is prepared, by writes that map nothing, so `RssShmem` shows none of it
//!   (PostgreSQL's main segment: ~11 MiB unseen);
//! - page tables (`VmPTE`, every level);
//! - kernel objects, estimated from their sizes in /proc/slabinfo: per
//!   thread a `task_struct`, a `pid` and a kernel stack (16 KiB on x86-64);
//!   per process an `mm_struct` and its signal, sighand, files and fs
//!   structures; per mapping a `vm_area_struct` with its anon_vma links;
//!   per open file a `file`, a dentry and an inode.
//!
//! Plus the agent's share: what the agent grew by since it started (its
//! private memory, page tables and kernel objects), its port keeper and
//! its spawner (`restore/spawner.rs`), one process each for all services,
//! divided by the services it holds. docs/parked-cost.md compares the
//! sum with the drop of the host's MemAvailable per parked service.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

pub use crate::control::ParkedCost;
use crate::process_tree::with_descendants;

/// A kernel stack per thread (`THREAD_SIZE` on x86-64).
const KERNEL_STACK_BYTES: u64 = 16 * 1024;

/// The cost of the processes `roots` and all their descendants, each counted
/// once, plus `agent_share_bytes`.
pub fn parked_cost(roots: &[i32], agent_share_bytes: u64) -> ParkedCost {
    let mut cost = ParkedCost {
        agent_share_bytes,
        ..ParkedCost::default()
    };
    let mut objects = HashSet::new();
    for pid in with_descendants(roots) {
        let process = process_cost(pid);
        cost.private_bytes += process.private_bytes;
        cost.page_table_bytes += process.page_table_bytes;
        cost.kernel_bytes += process.kernel_bytes;
        for object in shared_memory_objects(pid) {
            if objects.insert((object.device, object.inode)) {
                cost.private_bytes += object.bytes;
            }
        }
    }
    cost
}

/// A shared memory object a process maps: its identity and the memory it
/// holds.
struct SharedObject {
    device: u64,
    inode: u64,
    bytes: u64,
}

/// The shared memory objects (shmem files: memfds, `MAP_SHARED` anonymous
/// memory, System V segments, files under /dev/shm or another tmpfs) that
/// `pid` maps shared, with the pages each holds (`st_blocks`, what the
/// object allocated, mapped anywhere or not).
fn shared_memory_objects(pid: i32) -> Vec<SharedObject> {
    use std::os::unix::fs::MetadataExt;
    let Ok(maps) = procfs::process::Process::new(pid).and_then(|process| process.maps()) else {
        return Vec::new();
    };
    maps.iter()
        .filter(|map| map.perms.contains(procfs::process::MMPermissions::SHARED))
        .filter_map(|map| {
            let (start, end) = map.address;
            let link = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
            let on_shmem = nix::sys::statfs::statfs(link.as_str())
                .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
            if !on_shmem {
                // A shared mapping of a file on disk is the page cache's.
                return None;
            }
            let meta = std::fs::metadata(&link).ok()?;
            Some(SharedObject {
                device: meta.dev(),
                inode: meta.ino(),
                bytes: meta.blocks() * 512,
            })
        })
        .collect()
}

/// What the agent cost before it held any service (its runtime, the BPF
/// program's maps, its own code): the baseline its share per service is
/// counted from.
#[derive(Debug, Clone, Copy)]
pub struct AgentBaseline(u64);

impl AgentBaseline {
    /// The agent's cost now: taken before any service is registered, once
    /// the allocator gave back what starting up left free.
    pub fn now() -> Self {
        crate::sys::alloc::give_back_free_memory();
        Self(agent_bytes())
    }
}

/// The agent's share per service: what it grew by since `baseline` (the
/// memory, page tables and kernel objects the services made it hold), and
/// what its port keeper `keeper` and its spawner (with the memory it shares
/// with the agent) cost, divided by `services`. What removing one service
/// would give back.
pub fn agent_share(baseline: AgentBaseline, services: usize, keeper: Option<i32>) -> u64 {
    if services == 0 {
        return 0;
    }
    let helper = |pid: i32| {
        let cost = process_cost(pid);
        cost.private_bytes + cost.page_table_bytes + cost.kernel_bytes
    };
    let keeper = keeper.map_or(0, helper);
    let spawner =
        crate::restore::spawner_cost().map_or(0, |(pid, arena_bytes)| helper(pid) + arena_bytes);
    (agent_bytes().saturating_sub(baseline.0) + keeper + spawner) / services as u64
}

fn agent_bytes() -> u64 {
    let own = process_cost(std::process::id() as i32);
    own.private_bytes + own.page_table_bytes + own.kernel_bytes
}

/// One process's part of a [`ParkedCost`].
#[derive(Debug, Default)]
struct ProcessCost {
    private_bytes: u64,
    page_table_bytes: u64,
    kernel_bytes: u64,
}

fn process_cost(pid: i32) -> ProcessCost {
    let Ok(process) = procfs::process::Process::new(pid) else {
        return ProcessCost::default();
    };
    let Ok(status) = process.status() else {
        return ProcessCost::default();
    };
    let sizes = kernel_object_sizes();
    let threads = status.threads;
    let mappings = process.maps().map_or(0, |maps| maps.len() as u64);
    let files = process.fd_count().map_or(0, |count| count as u64);
    ProcessCost {
        // Shared memory (RssShmem) is counted per object by the caller.
        private_bytes: crate::process_tree::pss_anon_bytes(pid)
            .unwrap_or_else(|| status.rssanon.unwrap_or(0) * 1024),
        page_table_bytes: status.vmpte.unwrap_or(0) * 1024,
        kernel_bytes: sizes.per_process
            + threads * sizes.per_thread
            + mappings * sizes.per_mapping
            + files * sizes.per_file,
    }
}

/// Bytes of kernel objects per thread, process, mapping and open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KernelObjectSizes {
    per_thread: u64,
    per_process: u64,
    per_mapping: u64,
    per_file: u64,
}

fn kernel_object_sizes() -> KernelObjectSizes {
    static SIZES: OnceLock<KernelObjectSizes> = OnceLock::new();
    *SIZES.get_or_init(|| {
        let slabinfo = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
        sizes_from_slabinfo(&slabinfo)
    })
}

/// The sizes from /proc/slabinfo's object sizes, with a typical 6.x x86-64
/// size for a cache it does not list (or when it cannot be read).
fn sizes_from_slabinfo(slabinfo: &str) -> KernelObjectSizes {
    let objects: HashMap<&str, u64> = slabinfo
        .lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with("slabinfo"))
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let size = fields.nth(2)?.parse().ok()?;
            Some((name, size))
        })
        .collect();
    let size = |name: &str, typical: u64| objects.get(name).copied().unwrap_or(typical);
    KernelObjectSizes {
        per_thread: size("task_struct", 5824) + size("pid", 192) + KERNEL_STACK_BYTES,
        per_process: size("mm_struct", 1600)
            + size("signal_cache", 1152)
            + size("sighand_cache", 2112)
            + size("files_cache", 704)
            + size("fs_cache", 64),
        per_mapping: size("vm_area_struct", 192)
            + size("anon_vma_chain", 64)
            + size("anon_vma", 104),
        per_file: size("filp", 192) + size("dentry", 192) + size("sock_inode_cache", 832),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_sizes_come_from_slabinfo_with_typical_ones_for_missing_caches() {
        let slabinfo = "slabinfo - version: 2.1\n\
            # name <active_objs> <num_objs> <objsize> ...\n\
            task_struct 100 120 6000 5 8 : tunables 0 0 0 : slabdata 24 24 0\n\
            vm_area_struct 900 1000 200 20 1 : tunables 0 0 0 : slabdata 50 50 0\n";
        let sizes = sizes_from_slabinfo(slabinfo);
        assert_eq!(sizes.per_thread, 6000 + 192 + KERNEL_STACK_BYTES);
        assert_eq!(sizes.per_mapping, 200 + 64 + 104);
        assert_eq!(
            sizes_from_slabinfo("").per_thread,
            5824 + 192 + KERNEL_STACK_BYTES
        );
    }

    #[test]
    fn a_process_costs_at_least_its_private_memory_stack_and_mappings() {
        let me = std::process::id() as i32;
        let cost = parked_cost(&[me], 0);
        assert!(cost.private_bytes > 0, "{cost:?}");
        assert!(cost.page_table_bytes > 0, "{cost:?}");
        assert!(cost.kernel_bytes > KERNEL_STACK_BYTES, "{cost:?}");
        assert_eq!(parked_cost(&[me], 7).agent_share_bytes, 7);
        let child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let family = with_descendants(&[me]);
        assert!(family.contains(&(child.id() as i32)), "{family:?}");
        let alone = child.id() as i32;
        assert_eq!(with_descendants(&[alone, alone]).len(), 1, "counted once");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait_with_output();
    }

    #[test]
    fn a_shared_memory_object_counts_the_pages_it_holds_though_none_is_mapped() {
        use std::os::unix::fs::MetadataExt;
        let memfd =
            nix::sys::memfd::memfd_create(c"parked-cost-test", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd_create");
        let mut file = std::fs::File::from(memfd);
        // Filled by writes, as a skeleton's objects are: nothing is mapped.
        std::io::Write::write_all(&mut file, &[7u8; 16 * 4096]).expect("fill the memfd");
        let length = std::num::NonZeroUsize::new(16 * 4096).expect("non-zero");
        // SAFETY: a fresh shared mapping of our own memfd, never touched,
        // unmapped below.
        let mapping = unsafe {
            nix::sys::mman::mmap(
                None,
                length,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .expect("mmap the memfd");
        let inode = file.metadata().expect("fstat").ino();
        let objects = shared_memory_objects(std::process::id() as i32);
        // SAFETY: the mapping made above, used by nothing.
        unsafe { nix::sys::mman::munmap(mapping, length.get()) }.expect("munmap");
        let object = objects
            .iter()
            .find(|object| object.inode == inode)
            .expect("the memfd is listed");
        assert_eq!(object.bytes, 16 * 4096);
    }
}
