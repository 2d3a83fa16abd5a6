//! The generations of a `--on-idle keep` service's state: every park writes
//! a new one, a generation whose process crashes soon after a wake is marked
//! bad and the next wake restores the newest one still good, down to the
//! pristine image the service was built from.
//!
//! On disk, beside the pristine image `images/NAME`:
//!
//! ```text
//! images/NAME.gens/history.json   the records below, replaced whole
//! images/NAME.gens/1/             generation 1 (an image directory)
//! images/NAME.gens/2/             generation 2, its unchanged pages hard-linked from 1
//! ```
//!
//! Each generation is a delta image of the one its process was restored
//! from, its base stores hard-linked: removing any generation's directory
//! never takes pages from another. The history is written by root into the
//! root-only state directory and read back as a trusted file.

use std::fs;
use std::path::{Path, PathBuf};

use persist_common::trust::read_trusted_file;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::service::write_atomically;

/// Generations kept by default besides the pristine image and tagged ones.
pub const DEFAULT_KEEP: usize = 3;

/// Largest history file read back: thousands of records.
const MAX_HISTORY_BYTES: u64 = 1 << 20;

/// File name of the history inside the generations directory.
const HISTORY_FILE: &str = "history.json";

/// Which image a process was, or will be, restored from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Generation {
    /// The image the service was built from (or given with `--image`).
    Pristine,
    /// A state kept at a park, by number (1, 2, ...).
    Kept(u32),
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pristine => f.write_str("pristine"),
            Self::Kept(number) => write!(f, "{number}"),
        }
    }
}

impl std::str::FromStr for Generation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "pristine" {
            return Ok(Self::Pristine);
        }
        match text.parse::<u32>() {
            Ok(number) if number > 0 => Ok(Self::Kept(number)),
            _ => Err(format!(
                "{text:?} is not a generation: give its number (1, 2, ...) or \"pristine\""
            )),
        }
    }
}

/// What is known of one kept generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// Its number: one more than the newest before it.
    pub number: u32,
    /// When it was written, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Bytes of pages it stored itself (the rest are shared with older ones).
    pub new_bytes: u64,
    /// Wakes that restored it.
    pub wakes: u64,
    /// Why it is not restored any more: its process crashed after a wake,
    /// or it was rolled back by hand.
    pub bad: Option<String>,
    /// A name given with `snapshot --tag`: a tagged generation is never pruned.
    pub tag: Option<String>,
}

/// Errors reading or writing a service's generations.
#[derive(Debug, Error)]
pub enum GenerationsError {
    /// The history or a generation's directory could not be read or written.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The history file is not trusted or cannot be read.
    #[error(transparent)]
    Untrusted(#[from] persist_common::trust::TrustError),
    /// The history file does not parse.
    #[error("{path}: not a generation history")]
    Corrupt {
        /// The history file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A rollback or tag named a generation that is not kept.
    #[error("generation {0} is not kept (see `persist-agent history`)")]
    Unknown(Generation),
}

/// A service's generations: where they are and what is known of them.
#[derive(Debug, Clone)]
pub struct Generations {
    dir: PathBuf,
    pristine: PathBuf,
    records: Vec<GenerationRecord>,
    keep: usize,
}

impl Generations {
    /// Reads the generations kept in `dir`, `pristine` being the image they
    /// all descend from; at most `keep` untagged ones are kept. A state kept
    /// by an agent that wrote one image only (`legacy`, `NAME.kept`) becomes
    /// generation 1.
    pub fn load(
        dir: PathBuf,
        pristine: PathBuf,
        legacy: &Path,
        keep: usize,
    ) -> Result<Self, GenerationsError> {
        let history = dir.join(HISTORY_FILE);
        let records = match read_trusted_file(&history, MAX_HISTORY_BYTES) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| GenerationsError::Corrupt {
                    path: history.clone(),
                    source,
                })?
            }
            Err(err) if err.is_not_found() => Vec::new(),
            Err(err) => return Err(err.into()),
        };
        let mut generations = Self {
            dir,
            pristine,
            records,
            keep: keep.max(1),
        };
        if generations.reconcile_with_disk()? {
            generations.save()?;
        }
        let legacy_image = legacy.join(persist_common::image::MANIFEST_FILE);
        if generations.records.is_empty() && legacy_image.exists() {
            generations.create_dir()?;
            let first = generations.path(Generation::Kept(1));
            fs::rename(legacy, &first).map_err(|source| GenerationsError::Io {
                path: legacy.to_owned(),
                source,
            })?;
            generations.records.push(GenerationRecord {
                number: 1,
                created_unix_ms: now_unix_ms(),
                new_bytes: 0,
                wakes: 0,
                bad: None,
                tag: None,
            });
            generations.save()?;
        }
        Ok(generations)
    }

    /// Makes the records match the image directories on disk: a generation
    /// whose image was written whole (an image directory appears only once
    /// complete) but not recorded, because the daemon died in between, is
    /// recorded; a record whose directory is gone is dropped. Says whether
    /// anything changed.
    fn reconcile_with_disk(&mut self) -> Result<bool, GenerationsError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(GenerationsError::Io {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let on_disk: Vec<u32> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&number| number > 0 && self.has_image(Generation::Kept(number)))
            .collect();
        let before = self.records.len();
        self.records.retain(|record| {
            let kept = on_disk.contains(&record.number);
            if !kept {
                tracing::warn!(
                    "generation {} of {}: its image is gone, forgotten",
                    record.number,
                    self.dir.display()
                );
            }
            kept
        });
        let mut changed = self.records.len() != before;
        for number in on_disk {
            if !self.records.iter().any(|record| record.number == number) {
                tracing::info!(
                    "generation {number} of {}: written whole but not recorded, recorded now",
                    self.dir.display()
                );
                self.records.push(GenerationRecord {
                    number,
                    created_unix_ms: now_unix_ms(),
                    new_bytes: 0,
                    wakes: 0,
                    bad: None,
                    tag: None,
                });
                changed = true;
            }
        }
        self.records.sort_by_key(|record| record.number);
        Ok(changed)
    }

    fn has_image(&self, generation: Generation) -> bool {
        self.path(generation)
            .join(persist_common::image::MANIFEST_FILE)
            .is_file()
    }

    /// Every kept generation, oldest first.
    pub fn records(&self) -> &[GenerationRecord] {
        &self.records
    }

    /// The image directory of `generation`.
    pub fn path(&self, generation: Generation) -> PathBuf {
        match generation {
            Generation::Pristine => self.pristine.clone(),
            Generation::Kept(number) => self.dir.join(number.to_string()),
        }
    }

    /// The generation the next wake restores: the newest not marked bad,
    /// else the pristine image.
    pub fn current(&self) -> Generation {
        self.records
            .iter()
            .rev()
            .find(|record| record.bad.is_none())
            .map_or(Generation::Pristine, |record| {
                Generation::Kept(record.number)
            })
    }

    /// The number the next kept generation gets, and the directory to
    /// write it to (removed first if a failed write left it behind).
    pub fn next(&self) -> Result<(Generation, PathBuf), GenerationsError> {
        let number = self.records.last().map_or(1, |record| record.number + 1);
        let generation = Generation::Kept(number);
        let path = self.path(generation);
        self.create_dir()?;
        remove_dir(&path)?;
        self.remove_unfinished_writes();
        Ok((generation, path))
    }

    /// Records a generation just written to [`Self::next`]'s directory and
    /// prunes the oldest untagged ones past the limit, never `running`.
    pub fn add(
        &mut self,
        generation: Generation,
        new_bytes: u64,
        tag: Option<String>,
        running: Generation,
    ) -> Result<(), GenerationsError> {
        let Generation::Kept(number) = generation else {
            return Ok(());
        };
        self.records.push(GenerationRecord {
            number,
            created_unix_ms: now_unix_ms(),
            new_bytes,
            wakes: 0,
            bad: None,
            tag,
        });
        self.prune(&[running, generation])?;
        self.save()
    }

    /// Removes the staging directories (`.N.tmp-PID`) of image writes a
    /// killed daemon left unfinished. Called only before this service's
    /// next write, so none of them is being written.
    fn remove_unfinished_writes(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = remove_dir(&entry.path());
            }
        }
    }

    /// Forgets a generation whose write failed, removing what it left.
    pub fn discard_unrecorded(&self, generation: Generation) {
        if let Generation::Kept(number) = generation
            && !self.records.iter().any(|record| record.number == number)
        {
            let _ = remove_dir(&self.path(generation));
        }
    }

    /// Counts a wake that restored `generation`.
    pub fn count_wake(&mut self, generation: Generation) {
        if let Some(record) = self.record_mut(generation) {
            record.wakes += 1;
        }
    }

    /// Marks `generation` bad: no wake restores it again.
    pub fn mark_bad(
        &mut self,
        generation: Generation,
        reason: String,
    ) -> Result<(), GenerationsError> {
        if let Some(record) = self.record_mut(generation) {
            record.bad = Some(reason);
        }
        self.save()
    }

    /// Makes `target` the generation the next wake restores: every newer
    /// one is marked rolled back (kept, for `history`, until pruned), and
    /// `target` itself is good again.
    pub fn roll_back_to(&mut self, target: Generation) -> Result<(), GenerationsError> {
        let newer_than = match target {
            Generation::Pristine => 0,
            Generation::Kept(number) => {
                let record = self
                    .record_mut(target)
                    .ok_or(GenerationsError::Unknown(target))?;
                record.bad = None;
                number
            }
        };
        for record in &mut self.records {
            if record.number > newer_than && record.bad.is_none() {
                record.bad = Some(format!("rolled back by hand to generation {target}"));
            }
        }
        self.save()
    }

    /// Tags `generation`: it is never pruned.
    pub fn tag(&mut self, generation: Generation, tag: String) -> Result<(), GenerationsError> {
        let record = self
            .record_mut(generation)
            .ok_or(GenerationsError::Unknown(generation))?;
        record.tag = Some(tag);
        self.save()
    }

    /// Writes the history back (wake counts change in memory only until then).
    pub fn save(&self) -> Result<(), GenerationsError> {
        if self.records.is_empty() && !self.dir.exists() {
            return Ok(());
        }
        self.create_dir()?;
        let path = self.dir.join(HISTORY_FILE);
        let json = serde_json::to_vec_pretty(&self.records).expect("records always serialise");
        write_atomically(&path, &json).map_err(|source| GenerationsError::Io { path, source })
    }

    /// Removes every generation and the history (the service is removed,
    /// or its state was taken on another kernel).
    pub fn remove_all(&mut self) -> Result<(), GenerationsError> {
        self.records.clear();
        remove_dir(&self.dir)
    }

    /// Removes the oldest untagged generations past the limit, never one
    /// in `protected`.
    fn prune(&mut self, protected: &[Generation]) -> Result<(), GenerationsError> {
        let doomed = doomed(&self.records, self.keep, protected);
        for number in &doomed {
            remove_dir(&self.path(Generation::Kept(*number)))?;
        }
        self.records
            .retain(|record| !doomed.contains(&record.number));
        Ok(())
    }

    fn record_mut(&mut self, generation: Generation) -> Option<&mut GenerationRecord> {
        let Generation::Kept(number) = generation else {
            return None;
        };
        self.records
            .iter_mut()
            .find(|record| record.number == number)
    }

    fn create_dir(&self) -> Result<(), GenerationsError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&self.dir)
            .map_err(|source| GenerationsError::Io {
                path: self.dir.clone(),
                source,
            })
    }
}

/// The generations pruning removes: the oldest untagged ones beyond the
/// newest `keep` untagged, sparing those in `protected`.
fn doomed(records: &[GenerationRecord], keep: usize, protected: &[Generation]) -> Vec<u32> {
    let untagged: Vec<u32> = records
        .iter()
        .filter(|record| record.tag.is_none())
        .map(|record| record.number)
        .collect();
    let excess = untagged.len().saturating_sub(keep);
    untagged
        .into_iter()
        .take(excess)
        .filter(|number| !protected.contains(&Generation::Kept(*number)))
        .collect()
}

fn remove_dir(path: &Path) -> Result<(), GenerationsError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(GenerationsError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generations(dir: &Path, keep: usize) -> Generations {
        let legacy = dir.join("web.kept");
        Generations::load(dir.join("web.gens"), dir.join("web"), &legacy, keep).unwrap()
    }

    /// Writes a stand-in image directory for the next generation and records it.
    fn park(generations: &mut Generations, running: Generation) -> Generation {
        let (next, path) = generations.next().unwrap();
        fs::create_dir(&path).unwrap();
        fs::write(path.join(persist_common::image::MANIFEST_FILE), "{}").unwrap();
        generations.add(next, 4096, None, running).unwrap();
        next
    }

    #[test]
    fn the_newest_good_generation_is_restored_down_to_the_pristine_image() {
        let dir = tempfile::tempdir().unwrap();
        let mut gens = generations(dir.path(), 5);
        assert_eq!(gens.current(), Generation::Pristine);
        let first = park(&mut gens, Generation::Pristine);
        let second = park(&mut gens, first);
        assert_eq!(gens.current(), second);
        gens.mark_bad(second, "killed by SIGSEGV".into()).unwrap();
        assert_eq!(gens.current(), first, "rolled back past the bad one");
        gens.mark_bad(first, "exited with status 1".into()).unwrap();
        assert_eq!(gens.current(), Generation::Pristine);
    }

    #[test]
    fn pruning_keeps_the_newest_the_running_and_the_tagged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut gens = generations(dir.path(), 2);
        let first = park(&mut gens, Generation::Pristine);
        gens.tag(first, "before-migration".into()).unwrap();
        let second = park(&mut gens, first);
        park(&mut gens, second);
        // The process still runs generation 2 when 4 and 5 are written.
        park(&mut gens, second);
        let numbers: Vec<u32> = gens.records().iter().map(|r| r.number).collect();
        assert_eq!(numbers, [1, 2, 3, 4], "3 untagged beyond 2, but 2 runs");
        park(&mut gens, Generation::Kept(4));
        let numbers: Vec<u32> = gens.records().iter().map(|r| r.number).collect();
        assert_eq!(numbers, [1, 4, 5], "the tagged one stays");
        assert!(!gens.path(Generation::Kept(2)).exists(), "pruned from disk");
        assert!(gens.path(Generation::Kept(1)).exists());
    }

    #[test]
    fn the_history_survives_a_reload_and_a_legacy_kept_state_becomes_generation_1() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("web.kept");
        fs::create_dir(&legacy).unwrap();
        fs::write(legacy.join(persist_common::image::MANIFEST_FILE), "{}").unwrap();
        let mut gens = generations(dir.path(), 3);
        assert_eq!(gens.current(), Generation::Kept(1));
        assert!(!legacy.exists(), "moved into the generations");
        gens.count_wake(Generation::Kept(1));
        let second = park(&mut gens, Generation::Kept(1));
        gens.mark_bad(second, "killed by SIGABRT".into()).unwrap();
        let again = generations(dir.path(), 3);
        assert_eq!(again.records(), gens.records());
        assert_eq!(again.current(), Generation::Kept(1));
        assert_eq!(again.records()[0].wakes, 1, "saved with the next write");
    }

    #[test]
    fn a_generation_written_whole_but_not_recorded_is_recorded_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut gens = generations(dir.path(), 5);
        park(&mut gens, Generation::Pristine);
        // The daemon died after the image was renamed into place, before
        // the history was written; another write was left half done.
        let gens_dir = dir.path().join("web.gens");
        fs::create_dir(gens_dir.join("2")).unwrap();
        fs::write(
            gens_dir
                .join("2")
                .join(persist_common::image::MANIFEST_FILE),
            "{}",
        )
        .unwrap();
        fs::create_dir(gens_dir.join(".3.tmp-999")).unwrap();
        let again = generations(dir.path(), 5);
        assert_eq!(again.current(), Generation::Kept(2));
        let (next, _) = again.next().unwrap();
        assert_eq!(next, Generation::Kept(3));
        assert!(
            !gens_dir.join(".3.tmp-999").exists(),
            "the unfinished write is removed"
        );
        // A record whose image was removed is forgotten.
        fs::remove_dir_all(gens_dir.join("2")).unwrap();
        assert_eq!(generations(dir.path(), 5).current(), Generation::Kept(1));
    }

    #[test]
    fn rolling_back_by_hand_marks_the_newer_ones_and_clears_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut gens = generations(dir.path(), 5);
        let first = park(&mut gens, Generation::Pristine);
        park(&mut gens, first);
        gens.mark_bad(first, "killed by SIGSEGV".into()).unwrap();
        gens.roll_back_to(first).unwrap();
        assert_eq!(gens.current(), first);
        assert!(
            gens.records()[1]
                .bad
                .as_deref()
                .unwrap()
                .contains("rolled back")
        );
        gens.roll_back_to(Generation::Pristine).unwrap();
        assert_eq!(gens.current(), Generation::Pristine);
        assert!(matches!(
            gens.roll_back_to(Generation::Kept(9)),
            Err(GenerationsError::Unknown(Generation::Kept(9)))
        ));
    }

    #[test]
    fn generation_names_parse_and_print_alike() {
        for text in ["pristine", "1", "42"] {
            assert_eq!(text.parse::<Generation>().unwrap().to_string(), text);
        }
        assert!("0".parse::<Generation>().is_err());
        assert!("latest".parse::<Generation>().is_err());
    }
}
