//! Private memory a child of a tree shares copy-on-write with its parent,
//! restored shared again.
//!
//! The checkpoint stores such a page once: the child's run refers to the
//! parent's copy in the page store (`checkpoint/inherited_pages.rs`). Filling
//! each process from it would give every process a copy of its own, and a
//! woken pre-fork server would hold its master's pages once per worker. So,
//! as the kernel had them, they come back through a fork:
//!
//! 1. The parent, still a copy of the agent and before it forks its
//!    children, maps each of its mappings a child shares pages of in a
//!    staging area free in every address space involved (a *slot*, readable
//!    and writable), and stops itself (`SIGSTOP`); the agent writes the
//!    shared pages into the slots, each run checked against its checksum,
//!    and lets it go on. Its children inherit the slots through the fork.
//! 2. Each process's layout table keeps the staging area while it unmaps the
//!    agent, moves (`mremap`) the slots of the mappings it shares to their
//!    recorded places, sets their protection, and drops (`MADV_DONTNEED`)
//!    the staged pages it does not share: it stored its own version of
//!    those, or had none (zeros in anonymous memory, the file's page in a
//!    file mapping). The rest of the area goes.
//! 3. Its pager and the writes of its private file pages skip the pages it
//!    got from a slot ([`PresentPages`]).
//!
//! A mapping is shared only when the child's has the parent's range, kind
//! and backing (a private anonymous mapping, the heap, or a private file
//! mapping); the pages of any other stay the child's own, filled as before.
//! Equality of the stored copies is what decides, so two equal pages the
//! kernel did not share are shared now: nothing a process can see differs.
//! A process that stages a mapping for its children takes its own slot for
//! it, not one its parent staged. The stacks are left out (a `MAP_GROWSDOWN`
//! mapping would need its guard gap in the staging area).

use std::collections::BTreeMap;

use persist_common::image::{Manifest, Mapping, MappingKind, PAGE_SIZE};

/// What a tree's processes stage and take from the staging area.
#[derive(Debug, Default)]
pub(super) struct InheritedMemory {
    /// Each live process's part, in tree order.
    processes: Vec<ProcessPart>,
}

/// One process's part of [`InheritedMemory`].
#[derive(Debug, Default, Clone)]
pub(super) struct ProcessPart {
    /// The staging area, kept by its layout table while it unmaps the
    /// agent.
    pub area: Option<(u64, u64)>,
    /// Its mappings it stages before forking its children.
    pub stages: Vec<Stage>,
    /// Its mappings taken from a slot.
    pub uses: Vec<StagedUse>,
}

/// A mapping staged in its slot by the process that forks the children
/// sharing it.
#[derive(Debug, Clone)]
pub(super) struct Stage {
    /// Index of the mapping in the staging process's manifest.
    pub mapping: usize,
    /// Where it is staged.
    pub slot: u64,
    /// The pages staged, by their recorded addresses, sorted.
    pub pages: Vec<u64>,
}

/// A mapping a process takes from a slot.
#[derive(Debug, Clone)]
pub(super) struct StagedUse {
    /// Index of the mapping in its manifest.
    pub mapping: usize,
    /// The slot it is moved from.
    pub slot: u64,
    /// Staged ranges (at the recorded addresses) the process does not
    /// share: dropped once moved.
    pub discard: Vec<(u64, u64)>,
    /// The staged pages it keeps, sorted.
    pub present: Vec<u64>,
}

/// The pages a process gets from slots, which its pager and the writes of
/// its file pages leave alone.
#[derive(Debug, Default, Clone)]
pub(super) struct PresentPages(Vec<u64>);

impl PresentPages {
    /// True when the page at `address` came from a slot.
    pub fn contains(&self, address: u64) -> bool {
        self.0.binary_search(&address).is_ok()
    }

    /// Every such page, sorted.
    pub fn addresses(&self) -> &[u64] {
        &self.0
    }

    /// The `count` pages from `address` cut where they change between
    /// present and not: `(first page index, pages, present)`, in order.
    pub fn segments(&self, address: u64, count: u64) -> Vec<(u64, u64, bool)> {
        let mut segments: Vec<(u64, u64, bool)> = Vec::new();
        for page in 0..count {
            let present = self.contains(address + page * PAGE_SIZE);
            match segments.last_mut() {
                Some((_, pages, was)) if *was == present => *pages += 1,
                _ => segments.push((page, 1, present)),
            }
        }
        segments
    }
}

impl From<Vec<u64>> for PresentPages {
    fn from(mut addresses: Vec<u64>) -> Self {
        addresses.sort_unstable();
        Self(addresses)
    }
}

impl ProcessPart {
    /// The pages it gets from slots.
    pub fn present(&self) -> PresentPages {
        let pages: Vec<u64> = self
            .uses
            .iter()
            .flat_map(|using| using.present.iter().copied())
            .collect();
        PresentPages::from(pages)
    }
}

impl InheritedMemory {
    /// Plans the sharing for a tree: `manifests` are its live processes in
    /// tree order, `parents` the index of each one's parent, `busy` the
    /// ranges the staging area must avoid besides the processes' mappings
    /// (the agent's own layout).
    pub fn plan(manifests: &[&Manifest], parents: &[Option<usize>], busy: &[(u64, u64)]) -> Self {
        let live = manifests.len();
        // The pages each staged mapping holds, by (process, mapping).
        let mut staged: BTreeMap<(usize, usize), Vec<u64>> = BTreeMap::new();
        // (child, its mapping, parent, the parent's mapping, pages shared).
        let mut shares: Vec<(usize, usize, usize, usize, Vec<u64>)> = Vec::new();
        for child in 1..live {
            let Some(parent) = parents.get(child).copied().flatten().filter(|&p| p < live) else {
                continue;
            };
            for (index, mapping) in manifests[child].mappings.iter().enumerate() {
                if !stageable(mapping) {
                    continue;
                }
                let Some((parent_index, parent_mapping)) =
                    same_mapping(&manifests[parent].mappings, mapping)
                else {
                    continue;
                };
                let pages = shared_pages(parent_mapping, mapping);
                if pages.is_empty() {
                    continue;
                }
                staged
                    .entry((parent, parent_index))
                    .or_default()
                    .extend(&pages);
                shares.push((child, index, parent, parent_index, pages));
            }
        }
        let mut plan = Self {
            processes: vec![ProcessPart::default(); live],
        };
        if staged.is_empty() {
            return plan;
        }
        for pages in staged.values_mut() {
            pages.sort_unstable();
            pages.dedup();
        }
        // A page of distance between slots: no two staged mappings merge.
        let size: u64 = staged
            .keys()
            .map(|&(process, index)| manifests[process].mappings[index].len() + PAGE_SIZE)
            .sum();
        let mut avoid: Vec<(u64, u64)> = manifests
            .iter()
            .flat_map(|manifest| manifest.mappings.iter().map(|m| (m.start, m.end)))
            .chain(busy.iter().copied())
            .collect();
        avoid.sort_unstable();
        let Some(start) = super::layout::first_free(&avoid, size) else {
            // No room: every process gets its own copies, as before.
            return plan;
        };
        let area = (start, start + size);
        let mut slots: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        let mut next = start;
        for (&(process, index), pages) in &staged {
            slots.insert((process, index), next);
            let part = &mut plan.processes[process];
            part.stages.push(Stage {
                mapping: index,
                slot: next,
                pages: pages.clone(),
            });
            part.uses.push(StagedUse {
                mapping: index,
                slot: next,
                discard: Vec::new(),
                present: pages.clone(),
            });
            next += manifests[process].mappings[index].len() + PAGE_SIZE;
        }
        for (child, index, parent, parent_index, pages) in shares {
            let part = &mut plan.processes[child];
            if part.uses.iter().any(|using| using.mapping == index) {
                // It stages the mapping for its own children.
                continue;
            }
            let all = &staged[&(parent, parent_index)];
            part.uses.push(StagedUse {
                mapping: index,
                slot: slots[&(parent, parent_index)],
                discard: ranges(
                    all.iter()
                        .copied()
                        .filter(|a| pages.binary_search(a).is_err()),
                ),
                present: pages,
            });
        }
        for part in &mut plan.processes {
            part.area = Some(area);
        }
        plan
    }

    /// Process `index`'s part (nothing for a process of no tree).
    pub fn part(&self, index: usize) -> ProcessPart {
        self.processes.get(index).cloned().unwrap_or_default()
    }
}

/// True for a mapping whose pages may be staged: private anonymous memory,
/// the heap and private file mappings, with pages stored.
fn stageable(mapping: &Mapping) -> bool {
    !mapping.shared
        && !mapping.pages.is_empty()
        && matches!(
            mapping.kind,
            MappingKind::Anonymous | MappingKind::Heap | MappingKind::File { .. }
        )
}

/// The parent's mapping with the same range, kind and backing as `mapping`.
fn same_mapping<'a>(parents: &'a [Mapping], mapping: &Mapping) -> Option<(usize, &'a Mapping)> {
    let index = parents
        .binary_search_by_key(&mapping.start, |m| m.start)
        .ok()?;
    let parent = &parents[index];
    (parent.end == mapping.end && parent.kind == mapping.kind && stageable(parent))
        .then_some((index, parent))
}

/// The pages of `child` that refer to the page `parent` stored at the same
/// address, sorted.
fn shared_pages(parent: &Mapping, child: &Mapping) -> Vec<u64> {
    let mut pages = Vec::new();
    for run in &child.pages {
        for page in 0..run.count {
            let address = child.start + (run.first_page + page) * PAGE_SIZE;
            let offset = run.store_offset + page * PAGE_SIZE;
            if store_offset_at(parent, address) == Some(offset) {
                pages.push(address);
            }
        }
    }
    pages
}

/// Where the page `mapping` stored at `address` is in the page store.
fn store_offset_at(mapping: &Mapping, address: u64) -> Option<u64> {
    let page = (address - mapping.start) / PAGE_SIZE;
    let index = mapping.pages.partition_point(|run| run.first_page <= page);
    let run = mapping.pages.get(index.checked_sub(1)?)?;
    (page < run.first_page + run.count)
        .then(|| run.store_offset + (page - run.first_page) * PAGE_SIZE)
}

/// Sorted page addresses merged into ranges.
fn ranges(addresses: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for address in addresses {
        match ranges.last_mut() {
            Some((_, end)) if *end == address => *end += PAGE_SIZE,
            _ => ranges.push((address, address + PAGE_SIZE)),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use persist_common::image::PageRun;

    use super::*;

    const BASE: u64 = 0x7f00_0000_0000;

    fn run(first_page: u64, count: u64, store_offset: u64) -> PageRun {
        PageRun {
            first_page,
            count,
            store_offset,
            crc32c: 0,
        }
    }

    fn manifest(mappings: Vec<Mapping>) -> Manifest {
        Manifest {
            mappings,
            ..Manifest::default()
        }
    }

    #[test]
    fn a_child_takes_the_pages_it_refers_to_from_its_parents_slot() {
        // The parent stored pages 0..4; the child refers to pages 0 and 2,
        // stored its own page 1 and has no page 3.
        let parent = manifest(vec![Mapping::anonymous(BASE, 8, vec![run(0, 4, 0)])]);
        let child = manifest(vec![Mapping::anonymous(
            BASE,
            8,
            vec![
                run(0, 1, 0),
                run(1, 1, 4 * PAGE_SIZE),
                run(2, 1, 2 * PAGE_SIZE),
            ],
        )]);
        let plan = InheritedMemory::plan(&[&parent, &child], &[None, Some(0)], &[]);
        let (start, end) = plan.part(0).area.expect("pages are shared");
        assert!(end - start >= 8 * PAGE_SIZE);

        let root = plan.part(0);
        assert_eq!(root.stages.len(), 1);
        assert_eq!(root.stages[0].pages, vec![BASE, BASE + 2 * PAGE_SIZE]);
        assert_eq!(root.uses[0].discard, vec![]);
        assert_eq!(root.present().addresses(), &[BASE, BASE + 2 * PAGE_SIZE]);

        let worker = plan.part(1);
        assert!(worker.stages.is_empty());
        assert_eq!(worker.uses[0].slot, root.stages[0].slot);
        assert_eq!(worker.uses[0].discard, vec![]);
        assert!(worker.present().contains(BASE + 2 * PAGE_SIZE));
        assert!(!worker.present().contains(BASE + PAGE_SIZE));
    }

    #[test]
    fn a_page_staged_for_one_child_is_dropped_by_the_other() {
        let parent = manifest(vec![Mapping::anonymous(BASE, 4, vec![run(0, 2, 0)])]);
        let first = manifest(vec![Mapping::anonymous(BASE, 4, vec![run(0, 1, 0)])]);
        let second = manifest(vec![Mapping::anonymous(
            BASE,
            4,
            vec![run(1, 1, PAGE_SIZE)],
        )]);
        let plan =
            InheritedMemory::plan(&[&parent, &first, &second], &[None, Some(0), Some(0)], &[]);
        assert_eq!(plan.part(0).stages[0].pages.len(), 2);
        assert_eq!(
            plan.part(1).uses[0].discard,
            vec![(BASE + PAGE_SIZE, BASE + 2 * PAGE_SIZE)]
        );
        assert_eq!(plan.part(2).uses[0].discard, vec![(BASE, BASE + PAGE_SIZE)]);
    }

    #[test]
    fn segments_cut_a_run_where_presence_changes() {
        let present = PresentPages::from(vec![BASE + PAGE_SIZE, BASE + 2 * PAGE_SIZE]);
        assert_eq!(
            present.segments(BASE, 4),
            vec![(0, 1, false), (1, 2, true), (3, 1, false)]
        );
        assert_eq!(
            PresentPages::default().segments(BASE, 2),
            vec![(0, 2, false)]
        );
    }

    #[test]
    fn nothing_is_staged_for_another_range_or_backing() {
        let parent = manifest(vec![
            Mapping::anonymous(BASE, 4, vec![run(0, 1, 0)]),
            Mapping::anonymous(BASE + 0x10_0000, 4, vec![run(0, 1, PAGE_SIZE)]),
        ]);
        let mut heap = Mapping::anonymous(BASE + 0x10_0000, 4, vec![run(0, 1, PAGE_SIZE)]);
        heap.kind = MappingKind::Heap;
        // The same first page, but a mapping grown by a page.
        let child = manifest(vec![Mapping::anonymous(BASE, 5, vec![run(0, 1, 0)]), heap]);
        let plan = InheritedMemory::plan(&[&parent, &child], &[None, Some(0)], &[]);
        assert_eq!(plan.part(0).area, None);
        assert!(plan.part(1).uses.is_empty());
    }

    #[test]
    fn the_area_avoids_every_layout_and_the_busy_ranges() {
        let parent = manifest(vec![Mapping::anonymous(BASE, 4, vec![run(0, 1, 0)])]);
        let child = manifest(vec![Mapping::anonymous(BASE, 4, vec![run(0, 1, 0)])]);
        let busy = [(0, 0x5000_0000)];
        let plan = InheritedMemory::plan(&[&parent, &child], &[None, Some(0)], &busy);
        let (start, end) = plan.part(0).area.expect("shared");
        assert!(start >= 0x5000_0000 + PAGE_SIZE);
        assert!(end <= BASE || start >= BASE + 4 * PAGE_SIZE);
    }
}
