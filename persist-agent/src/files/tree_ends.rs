//! Pipes and UNIX socket pairs whose ends different processes of a tree
//! hold (separate open file descriptions, so not inherited descriptors):
//! each is created once, with its unread data, and each end handed to the
//! process that holds it as an inherited descriptor of its own number.

use std::collections::{HashMap, HashSet};

use persist_common::image::{FdInfo, FdKind};

use super::FilesError;
use super::pipe::Pipes;
use super::prepare::InheritedFds;
use super::recorded::PathAccess;
use super::unix::UnixPairs;

/// Creates every pipe and socket pair whose ends are saved by different
/// processes among `processes` (each one's own descriptors, in tree order),
/// and returns, for each process, the ends it installs, by number.
/// Everything else is left to each process's own [`super::prepare()`].
pub fn cross_process_ends(
    processes: &[&[FdInfo]],
    access: &PathAccess,
) -> Result<Vec<InheritedFds>, FilesError> {
    let mut pipe_holders: HashMap<u64, HashSet<usize>> = HashMap::new();
    let mut pair_holder: HashMap<u64, usize> = HashMap::new();
    for (index, fds) in processes.iter().enumerate() {
        for info in fds.iter().filter(|info| info.shared_with.is_none()) {
            match &info.kind {
                FdKind::Pipe {
                    inode,
                    fifo_path: None,
                    ..
                } => {
                    pipe_holders.entry(*inode).or_default().insert(index);
                }
                FdKind::UnixPair { inode, .. } => {
                    pair_holder.insert(*inode, index);
                }
                _ => {}
            }
        }
    }
    let mut cross: Vec<FdInfo> = Vec::new();
    let mut owners: Vec<usize> = Vec::new();
    for (index, fds) in processes.iter().enumerate() {
        for info in fds.iter().filter(|info| info.shared_with.is_none()) {
            let across = match &info.kind {
                FdKind::Pipe {
                    inode,
                    fifo_path: None,
                    ..
                } => pipe_holders
                    .get(inode)
                    .is_some_and(|holders| holders.len() > 1),
                FdKind::UnixPair { peer_inode, .. } => pair_holder
                    .get(peer_inode)
                    .is_some_and(|&holder| holder != index),
                _ => false,
            };
            if across {
                cross.push(info.clone());
                owners.push(index);
            }
        }
    }
    let mut ends: Vec<InheritedFds> = processes.iter().map(|_| InheritedFds::new()).collect();
    let mut pipes = Pipes::new(&cross);
    let mut pairs = UnixPairs::new(&cross);
    for (info, &owner) in cross.iter().zip(&owners) {
        let end = match &info.kind {
            FdKind::Pipe { inode, .. } => pipes.end(info, *inode, None, access)?,
            _ => pairs.end(info)?,
        };
        ends[owner].insert(info.fd, end);
    }
    pairs.finish()?;
    Ok(ends)
}
