//! System V shared memory of a restored process or tree: every segment its
//! processes had attached is made again, before any fork, in a fresh IPC
//! namespace of the tree's own, with its recorded id (`shm_next_id`), key,
//! size, owner, mode and contents. The restored processes join that
//! namespace before they fork (`child.rs`) and attach the segments at their
//! recorded addresses in their layout tables (`layout.rs`).
//!
//! A namespace of its own keeps the ids, which the processes hold (and
//! PostgreSQL writes into `postmaster.pid`), free of any segment on the
//! host, and two restores of one image apart. The semaphore sets and
//! message queues the image holds are made in the same namespace
//! (`sysv_ipc.rs`); one is made for them alone when there is no segment.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use persist_common::image::{Image, MappingKind, PAGE_SIZE};

use super::RestoreError;
use super::sysv_ipc;
use super::verify::stored_run;
use crate::sys::ipc::{self, SegmentSpec, ShmStat};

/// Makes the IPC namespace holding the System V segments that `images`
/// (the root's, then each descendant's) attach, and the semaphore sets and
/// message queues of the image; `None` when there are none of them, so the
/// processes stay in the agent's namespace.
pub(super) fn namespace(images: &[&Image]) -> Result<Option<OwnedFd>, RestoreError> {
    let mut segments: BTreeMap<i32, (ShmStat, Vec<u8>)> = BTreeMap::new();
    for image in images {
        let pid = image.manifest().process.pid;
        for mapping in &image.manifest().mappings {
            let MappingKind::SysvShm {
                key,
                shmid,
                size,
                uid,
                gid,
                mode,
                removed,
            } = mapping.kind
            else {
                continue;
            };
            let stat = ShmStat {
                key,
                size,
                uid,
                gid,
                mode,
                removed,
                attachments: 0,
            };
            if size.next_multiple_of(PAGE_SIZE) != mapping.len() {
                return Err(RestoreError::Layout(format!(
                    "pid {pid}: mapping {:#x}-{:#x} attaches System V shared memory shmid \
                     {shmid} of {size} bytes in part",
                    mapping.start, mapping.end
                )));
            }
            let (known, contents) = segments
                .entry(shmid)
                .or_insert_with(|| (stat, vec![0; size as usize]));
            if *known != stat {
                return Err(RestoreError::Layout(format!(
                    "pid {pid}: System V shared memory shmid {shmid} is recorded twice, \
                     differently ({known:?}, {stat:?})"
                )));
            }
            for run in &mapping.pages {
                let (_, bytes) = stored_run(image, mapping, run)?;
                let at = (run.first_page * PAGE_SIZE) as usize;
                let end = (at + bytes.len()).min(contents.len());
                if at < end {
                    contents[at..end].copy_from_slice(&bytes[..end - at]);
                }
            }
        }
    }
    // The tree's, recorded once in the manifest (every view has them).
    let ipc = images
        .first()
        .map(|image| &image.manifest().sysv_ipc)
        .filter(|ipc| !ipc.is_empty());
    if segments.is_empty() && ipc.is_none() {
        return Ok(None);
    }
    if let Some(ipc) = ipc {
        sysv_ipc::check(ipc).map_err(RestoreError::Layout)?;
    }
    let specs: Vec<SegmentSpec<'_>> = segments
        .iter()
        .map(|(&shmid, (stat, contents))| SegmentSpec {
            shmid,
            stat: *stat,
            contents,
        })
        .collect();
    ipc::namespace_with(&specs, || ipc.map_or(Ok(()), sysv_ipc::make))
        .map(Some)
        .map_err(|err| RestoreError::io("IPC namespace for System V IPC objects", err))
}
