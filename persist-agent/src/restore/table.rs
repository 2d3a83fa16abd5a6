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
    pub labels: Vec<String>,
}

impl Table {
    /// The label of the entry at `index`.
    pub fn label(&self, index: usize) -> &str {
        self.labels.get(index).map_or("?", String::as_str)
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
    labels: Vec<String>,
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
    pub fn call(&mut self, label: impl Into<String>, nr: i64, args: &[u64]) {
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
}
