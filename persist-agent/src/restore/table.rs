//! Building restorer tables: the region image (routine, data, syscall
//! entries) that a process being restored runs natively.

use crate::sys::blob::{self, ENTRY_SIZE, SyscallEntry};

/// A table ready to be placed at `base`: routine first, then the data the
/// entries point to, then the entries.
#[derive(Debug, Clone)]
pub struct Table {
    /// Address the bytes are built for.
    pub base: u64,
    /// The region's bytes from `base` on.
    pub bytes: Vec<u8>,
    /// Address of the first entry.
    pub entries_addr: u64,
    /// Number of entries.
    pub count: u64,
    /// What each entry does, for error messages.
    pub labels: Vec<Label>,
}

/// What a table entry does, for the message when it fails: put into words
/// only then, as a process's table has hundreds of entries and nearly
/// always runs through (formatting every label took ~0.2 ms a process of
/// PostgreSQL's tree).
#[derive(Debug, Clone)]
pub enum Label {
    /// Words known when the entry was added.
    Text(std::borrow::Cow<'static, str>),
    /// `OP N`: an operation on a numbered thing (`close fd 7`).
    Numbered {
        /// What is done, up to the number.
        op: &'static str,
        /// The descriptor, signal or resource number.
        n: i64,
    },
    /// `OP START-END (WHAT)`: an operation on an address range.
    Range {
        /// What is done, up to the range.
        op: &'static str,
        /// Its first address.
        start: u64,
        /// The address after it.
        end: u64,
        /// What backs it, if said.
        what: Option<String>,
    },
}

impl From<&'static str> for Label {
    fn from(text: &'static str) -> Self {
        Self::Text(text.into())
    }
}

impl From<String> for Label {
    fn from(text: String) -> Self {
        Self::Text(text.into())
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Text(text) => f.write_str(text),
            Self::Numbered { op, n } => write!(f, "{op} {n}"),
            Self::Range {
                op,
                start,
                end,
                what,
            } => {
                write!(f, "{op} {start:#x}-{end:#x}")?;
                match what {
                    Some(what) => write!(f, " ({what})"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl Table {
    /// The label of the entry at `index`.
    pub fn label(&self, index: usize) -> String {
        self.labels
            .get(index)
            .map_or_else(|| "?".to_owned(), Label::to_string)
    }

    /// Index of the entry at `address`, if it is one.
    pub fn index_of(&self, address: u64) -> Option<usize> {
        let offset = address.checked_sub(self.entries_addr)?;
        let index = (offset / ENTRY_SIZE as u64) as usize;
        (index < self.count as usize).then_some(index)
    }
}

/// Accumulates data and entries for one [`Table`].
#[derive(Debug)]
pub struct TableBuilder {
    base: u64,
    bytes: Vec<u8>,
    entries: Vec<SyscallEntry>,
    labels: Vec<Label>,
}

impl TableBuilder {
    /// Starts a table for a region at `base`.
    pub fn new(base: u64) -> Self {
        let mut bytes = blob::code().to_vec();
        bytes.resize(bytes.len().next_multiple_of(64), 0xcc);
        Self {
            base,
            bytes,
            entries: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Stores `data` (8-byte aligned) and returns its address.
    pub fn data(&mut self, data: &[u8]) -> u64 {
        self.bytes.resize(self.bytes.len().next_multiple_of(8), 0);
        let address = self.base + self.bytes.len() as u64;
        self.bytes.extend_from_slice(data);
        address
    }

    /// Stores 64-bit words and returns their address.
    pub fn words(&mut self, words: &[u64]) -> u64 {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        self.data(&bytes)
    }

    /// Appends a system call.
    pub fn call(&mut self, label: impl Into<Label>, nr: i64, args: &[u64]) {
        self.entries.push(SyscallEntry::new(nr, args));
        self.labels.push(label.into());
    }

    /// Lays out the entries after the data.
    pub fn finish(mut self) -> Table {
        self.bytes.resize(self.bytes.len().next_multiple_of(64), 0);
        let entries_addr = self.base + self.bytes.len() as u64;
        for entry in &self.entries {
            self.bytes.extend_from_slice(&entry.to_bytes());
        }
        Table {
            base: self.base,
            bytes: self.bytes,
            entries_addr,
            count: self.entries.len() as u64,
            labels: self.labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_data_and_point_into_the_region() {
        let mut builder = TableBuilder::new(0x10_0000);
        let address = builder.words(&[1, 2, 3]);
        builder.call("getpid", libc::SYS_getpid, &[address]);
        let table = builder.finish();
        assert!(address >= 0x10_0000 + blob::code().len() as u64);
        assert!(table.entries_addr > address);
        assert_eq!(table.entries_addr % 64, 0);
        assert_eq!(table.index_of(table.entries_addr), Some(0));
        assert_eq!(table.index_of(table.entries_addr + 64), None);
        let offset = (table.entries_addr - table.base) as usize;
        assert_eq!(
            &table.bytes[offset + 8..offset + 16],
            &address.to_ne_bytes()
        );
    }

    #[test]
    fn a_failed_entry_is_named_as_its_label_says() {
        let mut builder = TableBuilder::new(0x10_0000);
        builder.call("umask", libc::SYS_umask, &[0o22]);
        builder.call(
            Label::Numbered {
                op: "close fd",
                n: 7,
            },
            libc::SYS_close,
            &[7],
        );
        builder.call(
            Label::Range {
                op: "mmap of mapping",
                start: 0x7f00_0000_0000,
                end: 0x7f00_0000_2000,
                what: Some("/usr/lib/libc.so.6".into()),
            },
            libc::SYS_mmap,
            &[],
        );
        builder.call(
            Label::Range {
                op: "userfaultfd registration of mapping",
                start: 0x1000,
                end: 0x3000,
                what: None,
            },
            libc::SYS_ioctl,
            &[],
        );
        let table = builder.finish();
        assert_eq!(table.label(0), "umask");
        assert_eq!(table.label(1), "close fd 7");
        assert_eq!(
            table.label(2),
            "mmap of mapping 0x7f0000000000-0x7f0000002000 (/usr/lib/libc.so.6)"
        );
        assert_eq!(
            table.label(3),
            "userfaultfd registration of mapping 0x1000-0x3000"
        );
        assert_eq!(table.label(4), "?");
    }
}
