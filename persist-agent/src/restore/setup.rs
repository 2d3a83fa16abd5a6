//! One process of a restore, prepared before its fork ([`Setup::new`]) and
//! completed once forked ([`Setup::finish`]): the steps of
//! [`super::Skeleton::prepare`], apart so that a tree's processes are all
//! prepared before the first fork and all forked before the first layout.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use persist_common::image::{Image, MappingKind};

use super::child::StagedMap;
use super::inherited_memory::{PresentPages, ProcessPart};
use super::layout::{self, OwnLayout, Region};
use super::pager::Pager;
use super::posix_shm::MadeFile;
use super::resources::{OpenedForTree, Resources};
use super::runner::{self, TableRunner, check_table};
use super::shared_pages::SharedPages;
use super::skeleton::{OnPager, ResumeTimers, Skeleton, Timings, sigcont_is_default};
use super::spawn::{self, KillGuard, Spawned, SyncPipes, pipe_above};
use super::table::{Label, Table};
use super::{RestoreError, child::ChildPlan, file_pages, threads};
use crate::files::{self, InheritedFds, PathAccess, PreparedFds};
use crate::sys::pidfd::PidFd;
use crate::sys::procmem::ProcMem;
use crate::sys::uffd::Userfault;

/// One process, its descriptors re-created and its layout table built,
/// not forked yet.
pub(super) struct Setup {
    pub(super) image: Arc<Image>,
    fds: PreparedFds,
    /// Its timerfds, unarmed: armed when it resumes.
    timerfds: Vec<files::TimerfdArm>,
    uffd_fd: RawFd,
    resources: Resources,
    region: Region,
    keep: Vec<RawFd>,
    go_read: OwnedFd,
    go_write: OwnedFd,
    status_read: OwnedFd,
    status_write: OwnedFd,
    init_go_read: OwnedFd,
    init_go_write: OwnedFd,
    /// The IPC namespace it joins first (System V shared memory).
    ipc_namespace: Option<RawFd>,
    /// Its parent is restored too (a descendant of a tree).
    parent_restored: bool,
    /// The stored pages of the shared memory objects served lazily, for
    /// its pager.
    lazy_shared: Arc<SharedPages>,
    /// What it stages for its children and takes from staged copies.
    inherited: ProcessPart,
    /// Its staged mappings, as its fork maps them.
    staged_maps: Vec<StagedMap>,
    /// Its forked process was let run its layout table
    /// ([`Setup::start_layout`]).
    layout_started: bool,
}

impl Setup {
    /// Re-creates the descriptors of `image`'s process (those of
    /// `inherited` installed as given), opens what its layout maps (its
    /// shared memory objects through `shared`, see [`Resources::open`]) and
    /// builds its layout table. `lazy_shared`: the shared memory objects
    /// of its tree served lazily. `in_tree`: for a process of a tree, its
    /// part of the tree's shared private memory (`inherited_memory.rs`);
    /// its session and process group are then set when it is forked, not
    /// by the table. `own`: the agent's layout, read once for every process
    /// of a tree.
    pub(super) fn new(
        image: Arc<Image>,
        inherited: InheritedFds,
        access: &PathAccess,
        opened: &mut OpenedForTree,
        lazy_shared: &Arc<SharedPages>,
        in_tree: Option<ProcessPart>,
        own: &OwnLayout,
    ) -> Result<Self, RestoreError> {
        let manifest = image.manifest();
        if manifest.threads.is_empty() {
            return Err(RestoreError::Layout("the image has no threads".into()));
        }
        if manifest.process.root != "/" {
            return Err(RestoreError::Layout(format!(
                "root directory {} is not supported (only /)",
                manifest.process.root
            )));
        }
        let mut fds = files::prepare(&manifest.fds, inherited, access)?;
        let timerfds = fds.take_timerfds();
        let uffd_fd = (fds.max_target_fd() + 1).max(100);
        let mut resources =
            Resources::open(&image, &fds, uffd_fd + 1, access, opened, lazy_shared)?;
        resources.attributes.session_set = in_tree.is_some();
        let memory = in_tree.unwrap_or_default();
        let (go_read, go_write) = pipe_above(uffd_fd + 1)?;
        let (status_read, status_write) = pipe_above(uffd_fd + 1)?;
        let (init_go_read, init_go_write) = pipe_above(uffd_fd + 1)?;
        let mut layout_fds = resources.layout_fds(uffd_fd);
        // The child's ends of the pipes are ours too: gone before it runs.
        layout_fds.close.extend([
            go_read.as_raw_fd(),
            status_write.as_raw_fd(),
            init_go_read.as_raw_fd(),
        ]);
        let region = layout::build(manifest, own, &layout_fds, &resources.attributes, &memory)?;
        let staged_maps = memory
            .stages
            .iter()
            .map(|stage| {
                let mapping = &manifest.mappings[stage.mapping];
                let (fd, offset) = match &mapping.kind {
                    MappingKind::File { offset, .. } => {
                        let fd = layout_fds.mapping_fds.get(stage.mapping).copied().flatten();
                        let fd = fd.ok_or_else(|| {
                            RestoreError::Layout(format!(
                                "no descriptor to stage mapping {:#x} from",
                                mapping.start
                            ))
                        })?;
                        (Some(fd), *offset)
                    }
                    _ => (None, 0),
                };
                Ok(StagedMap {
                    slot: stage.slot,
                    len: mapping.len(),
                    fd,
                    offset,
                })
            })
            .collect::<Result<Vec<_>, RestoreError>>()?;
        let mut keep: Vec<RawFd> = resources.raw_fds();
        keep.extend([
            uffd_fd,
            go_read.as_raw_fd(),
            status_write.as_raw_fd(),
            init_go_read.as_raw_fd(),
        ]);
        keep.sort_unstable();
        Ok(Self {
            image,
            fds,
            timerfds,
            uffd_fd,
            resources,
            region,
            keep,
            go_read,
            go_write,
            status_read,
            status_write,
            init_go_read,
            init_go_write,
            ipc_namespace: None,
            parent_restored: false,
            lazy_shared: Arc::clone(lazy_shared),
            inherited: memory,
            staged_maps,
            layout_started: false,
        })
    }

    /// Lets forked process `pid` (seized, stopped before its layout) run
    /// its layout table now, on its own: the processes of a tree build
    /// theirs side by side, and [`Setup::finish`] waits for its end.
    pub(super) fn start_layout(&mut self, pid: i32) -> Result<(), RestoreError> {
        spawn::send_go(pid, &self.go_write)?;
        self.layout_started = true;
        Ok(())
    }

    /// Leaves the pages of its read-only file mappings to fault in when
    /// touched: no populate before the resume
    /// ([`super::RestoreConfig::cold`]).
    pub(super) fn leave_file_pages_to_fault(&mut self) {
        self.region.populate.clear();
    }

    /// True when its fork stages memory for its children, and stops for
    /// [`Setup::fill_staged`] before forking them.
    pub(super) fn stages_memory(&self) -> bool {
        !self.staged_maps.is_empty()
    }

    /// Writes the pages its children share into the slots its fork `pid`
    /// mapped (stopped before its first fork), each run checked against its
    /// checksum first. Returns the number of pages written.
    pub(super) fn fill_staged(&self, pid: i32) -> Result<u64, RestoreError> {
        let mem = ProcMem::open(pid).map_err(RestoreError::ptrace(pid, "open /proc/PID/mem"))?;
        let manifest = self.image.manifest();
        let mut written = 0;
        for stage in &self.inherited.stages {
            let mapping = &manifest.mappings[stage.mapping];
            let staged = PresentPages::from(stage.pages.clone());
            for run in &mapping.pages {
                written += file_pages::write_run(
                    &self.image,
                    &mem,
                    mapping,
                    run,
                    &staged,
                    true,
                    stage.slot,
                )?;
            }
        }
        Ok(written)
    }

    /// What the forked child does before its layout table.
    pub(super) fn plan(&self) -> ChildPlan<'_> {
        ChildPlan {
            fds: self.fds.child_fds(),
            keep: &self.keep,
            uffd_fd: self.uffd_fd,
            go_fd: self.go_read.as_raw_fd(),
            status_fd: self.status_write.as_raw_fd(),
            region_base: self.region.base,
            region_size: self.region.size as usize,
            region_bytes: &self.region.layout.bytes,
            table_addr: self.region.layout.entries_addr,
            table_count: self.region.layout.count,
            ipc_namespace: self.ipc_namespace,
            staged: &self.staged_maps,
            own_fds_below: None,
        }
    }

    /// Has the forked process join IPC namespace `namespace` (kept open
    /// by the caller until it is forked) before anything else.
    pub(super) fn join_ipc_namespace(&mut self, namespace: RawFd) {
        self.ipc_namespace = Some(namespace);
    }

    /// Marks it a descendant of a restored tree: its parent is restored
    /// with it, so its parent-death signal is set again.
    pub(super) fn set_parent_restored(&mut self) {
        self.parent_restored = true;
    }

    /// The POSIX shared memory files made for it, which a failed restore
    /// removes.
    pub(super) fn created_files(&self) -> Vec<MadeFile> {
        self.resources.created_files.clone()
    }

    /// The agent's ends of the pipes to the forked child.
    pub(super) fn pipes(&self) -> SyncPipes<'_> {
        SyncPipes {
            status: &self.status_read,
            init_go: &self.init_go_write,
            init_go_child: self.init_go_read.as_raw_fd(),
        }
    }

    /// The prepared descriptors, for another process of a tree to install
    /// the same open file descriptions.
    pub(super) fn fds(&self) -> &PreparedFds {
        &self.fds
    }

    /// Completes forked process `pid` (seized, stopped before its layout):
    /// builds its layout, its pager (handed to `on_pager` once the memory
    /// the agent writes is in), its threads and their state. Threads made
    /// go on `guard`.
    pub(super) fn finish(
        self,
        spawned: Spawned,
        started: Instant,
        forked_at: Instant,
        on_pager: Option<OnPager>,
        guard: &mut KillGuard,
    ) -> Result<Skeleton, RestoreError> {
        let Spawned {
            pid,
            init_pid,
            lease,
        } = spawned;
        let image = self.image;
        let manifest = image.manifest();
        if !self.layout_started {
            spawn::send_go(pid, &self.go_write)?;
        }
        let proc_self_positions = self.fds.proc_self_positions();
        // The child holds its own copies: ours are closed while it builds
        // its layout. One the spawner forked shares our table until it
        // takes its own copy: ours are closed once its layout is built.
        let (fds, resources) = (self.fds, self.resources);
        let held = if lease.is_some() {
            Some((fds, resources))
        } else {
            drop((fds, resources));
            None
        };
        spawn::wait_for_layout(pid, &self.status_read)?;
        // Its layout no longer maps the spawner's arena, nor shares our
        // descriptors.
        drop((lease, held));
        check_table(pid, &self.region.layout)?;
        let layout_time = forked_at.elapsed();

        // One pidfd for the skeleton, its pager and its continuer: a parked
        // service's descriptors in the agent count against its open-files
        // limit.
        let pidfd = Arc::new(PidFd::open(pid).map_err(RestoreError::ptrace(pid, "pidfd_open"))?);
        let uffd = pidfd
            .get_fd(self.uffd_fd)
            .map_err(RestoreError::ptrace(pid, "pidfd_getfd of its userfaultfd"))?;
        let mem = ProcMem::open(pid).map_err(RestoreError::ptrace(pid, "open /proc/PID/mem"))?;
        let present = self.inherited.present();
        // The pages it wrote in its private file mappings (about 2 MiB for
        // python, a millisecond of checks and copies) are written here,
        // while the process itself puts its code and read-only data in its
        // page tables on the other CPU (another millisecond for python).
        // All before any code of its threads runs, as the kernel may write
        // into those pages then (an rseq area). Without such a populate, a
        // second thread starts on the file pages at once and this one
        // joins it once it built the pager (a quarter of a millisecond for
        // python's 2,250 stored pages). The pages it took from a staged
        // copy are there already.
        let populate = start_populate(pid, &mem, &self.region)?;
        let file_runs = file_pages::SharedRuns::of(&image);
        let (written, mut pager) = std::thread::scope(|scope| {
            // Not beside the populate, which has the other CPU.
            let helper = (populate.is_none() && file_runs.pages() >= PARALLEL_FILE_PAGES)
                .then(|| {
                    std::thread::Builder::new()
                        .name("persist-files".into())
                        .spawn_scoped(scope, || file_runs.write(&image, &mem, &present))
                        .ok()
                })
                .flatten();
            let mut pager = Pager::new(
                Userfault::new(uffd),
                Arc::clone(&pidfd),
                Arc::clone(&image),
                &self.lazy_shared,
            );
            pager.mark_present(present.addresses());
            let written = file_runs.write(&image, &mem, &present);
            let helped = helper.map_or(Ok(0), |helper| {
                helper.join().unwrap_or_else(|_| {
                    Err(RestoreError::Layout(format!(
                        "the thread writing file pages of pid {pid} panicked"
                    )))
                })
            });
            (written.and(helped), pager)
        });
        written?;
        if let Some(table) = populate {
            finish_populate(pid, &table)?;
        }
        // Not sooner: a copy beside the populate and the file pages took
        // the CPUs they needed, and the prepare ended later.
        if let Some(on_pager) = on_pager {
            (on_pager.0)(&mut pager);
        }

        // Its threads and their state.
        let mut runner = TableRunner {
            pid,
            mem: &mem,
            region: &self.region,
        };
        let tids = threads::create(&mut runner, manifest)?;
        guard.threads.extend(tids.iter().skip(1));
        let resume_table = threads::restore_state(
            &mut runner,
            manifest,
            &tids,
            &mut pager,
            self.parent_restored,
        )?;
        files::restore_proc_self_positions(&pidfd, &proc_self_positions)?;
        files::warm_own_proc_entries(pid);

        Ok(Skeleton {
            pid,
            tids,
            init_pid,
            sigcont_is_default: sigcont_is_default(manifest),
            timers: Some(ResumeTimers {
                timerfds: self.timerfds,
                table: resume_table,
            }),
            uffd_fd: self.uffd_fd,
            continuer: None,
            descendants: Vec::new(),
            posix_shm_files: Vec::new(),
            pidfd: Some(pidfd),
            pager: Some(pager),
            timings: Timings {
                prepare: started.elapsed(),
                setup: forked_at - started,
                layout: layout_time,
                finish: forked_at.elapsed() - layout_time,
                resume: Duration::ZERO,
            },
        })
    }
}

/// Starts the table putting the pages of the read-only file mappings of
/// `region`'s process in its page tables (`MADV_POPULATE_READ`), stopped
/// `pid` running it while the agent goes on. `None` when it has none.
fn start_populate(pid: i32, mem: &ProcMem, region: &Region) -> Result<Option<Table>, RestoreError> {
    if region.populate.is_empty() {
        return Ok(None);
    }
    let runner = TableRunner { pid, mem, region };
    let mut table = runner.table();
    for &(start, len) in &region.populate {
        table.call(
            Label::Range {
                op: "populate of mapping",
                start,
                end: start + len,
                what: None,
            },
            libc::SYS_madvise,
            &[start, len, libc::MADV_POPULATE_READ as u64],
        );
    }
    let table = table.finish();
    runner.load(&table)?;
    runner::start(pid, &table)?;
    Ok(Some(table))
}

/// Waits for the end of the table [`start_populate`] started. A
/// mapping it could not populate (a file shorter than its mapping now)
/// is not an error: its pages, and those of the mappings after it, fault
/// in when touched, as they would have in the original process.
fn finish_populate(pid: i32, table: &Table) -> Result<(), RestoreError> {
    match runner::wait_for_end(pid, table, false) {
        Err(RestoreError::Step { step, source, .. }) => {
            tracing::debug!(pid, "{step}: {source}; its pages fault in when touched");
            Ok(())
        }
        other => other.map(drop),
    }
}

/// Pages written back into private file mappings worth a thread of their
/// own: starting one costs tens of µs, about what 16 pages' writes cost.
const PARALLEL_FILE_PAGES: u64 = 64;
