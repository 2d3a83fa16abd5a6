//! Running restorer tables in the stopped process: each is written into
//! the restorer region and run by the routine there ([`crate::sys::blob`]),
//! natively, from one thread's current state, until its final `int3`.

use super::RestoreError;
use super::layout::Region;
use super::table::{Table, TableBuilder};
use crate::sys::procmem::ProcMem;
use crate::sys::ptrace::{self, Regs, Stop, reg};

/// Checks a table run's result registers at its int3.
pub(super) fn check_table(tid: i32, table: &Table) -> Result<(), RestoreError> {
    let regs = ptrace::get_regs(tid).map_err(RestoreError::ptrace(tid, "getregs"))?;
    if regs[R13] == 0 {
        return Ok(());
    }
    let index = table.index_of(regs[R12]);
    let errno = -(regs[reg::RAX] as i64);
    Err(RestoreError::Step {
        pid: tid,
        step: index.map_or_else(|| "?".to_owned(), |i| table.label(i)),
        source: std::io::Error::from_raw_os_error(errno as i32),
    })
}

/// `r12` and `r13` in `user_regs_struct`: the routine's cursor and count.
const R12: usize = 3;
const R13: usize = 2;

/// Runs tables in the stopped process, after the one that built its layout.
pub(super) struct TableRunner<'a> {
    /// The process (its main thread).
    pub(super) pid: i32,
    /// Its memory, to write the tables into.
    pub(super) mem: &'a ProcMem,
    /// The restorer region, where the tables go.
    pub(super) region: &'a Region,
}

impl TableRunner<'_> {
    /// A new table for the restorer region.
    pub(super) fn table(&self) -> TableBuilder {
        TableBuilder::new(self.region.base)
    }

    /// Runs `table` in stopped thread `tid`; returns the tids of threads it
    /// created (in creation order).
    pub(super) fn run(
        &mut self,
        tid: i32,
        table: Table,
        ends_unmapped: bool,
    ) -> Result<Vec<i32>, RestoreError> {
        self.load(&table)?;
        execute(tid, &table, ends_unmapped)
    }

    /// Writes `table` into the restorer region, to be run later by
    /// [`execute`].
    pub(super) fn load(&self, table: &Table) -> Result<(), RestoreError> {
        if table.bytes.len() as u64 > self.region.table_room {
            return Err(RestoreError::Layout(format!(
                "a table of {} bytes does not fit the restorer region",
                table.bytes.len()
            )));
        }
        self.mem
            .write_all_at(table.base, &table.bytes)
            .map_err(RestoreError::ptrace(self.pid, "write the restorer table"))
    }
}

/// Runs `table`, already [loaded](TableRunner::load) in the restorer
/// region, in stopped thread `tid`; returns the tids of threads it created
/// (in creation order). With `ends_unmapped`, the table unmaps the region
/// and its run ends with the `SIGSEGV` of the next instruction fetch.
pub(super) fn execute(
    tid: i32,
    table: &Table,
    ends_unmapped: bool,
) -> Result<Vec<i32>, RestoreError> {
    start(tid, table)?;
    wait_for_end(tid, table, ends_unmapped)
}

/// Lets stopped thread `tid` run `table`, already
/// [loaded](TableRunner::load), and returns at once: [`wait_for_end`]
/// waits for its end.
pub(super) fn start(tid: i32, table: &Table) -> Result<(), RestoreError> {
    let mut regs: Regs = ptrace::get_regs(tid).map_err(RestoreError::ptrace(tid, "getregs"))?;
    regs[reg::RIP] = table.base;
    regs[reg::RDI] = table.entries_addr;
    regs[reg::RSI] = table.count;
    regs[reg::ORIG_RAX] = u64::MAX;
    regs[reg::RAX] = 0;
    ptrace::set_regs(tid, &regs).map_err(RestoreError::ptrace(tid, "setregs"))?;
    ptrace::cont(tid, 0).map_err(RestoreError::ptrace(tid, "cont"))
}

/// Waits for the end of `table`, [started](start) in thread `tid`; returns
/// the tids of threads it created, as [`execute`].
pub(super) fn wait_for_end(
    tid: i32,
    table: &Table,
    ends_unmapped: bool,
) -> Result<Vec<i32>, RestoreError> {
    let mut created = Vec::new();
    loop {
        match ptrace::wait(tid).map_err(RestoreError::ptrace(tid, "wait"))? {
            Stop::Event {
                event: ptrace::PTRACE_EVENT_CLONE,
                ..
            } => {
                let new = ptrace::event_message(tid)
                    .map_err(RestoreError::ptrace(tid, "event message"))?;
                created.push(new as i32);
                ptrace::cont(tid, 0).map_err(RestoreError::ptrace(tid, "cont"))?;
            }
            Stop::Signal(libc::SIGTRAP) => break,
            Stop::Signal(libc::SIGSEGV) if ends_unmapped => return Ok(created),
            other => {
                return Err(RestoreError::Unexpected {
                    pid: tid,
                    what: format!("{other:?} while running a restorer table"),
                });
            }
        }
    }
    check_table(tid, table)?;
    Ok(created)
}
