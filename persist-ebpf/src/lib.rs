//! The kernel side of persist.
//!
//! The BPF programs are written in C (`bpf/`) and compiled by clang from
//! `build.rs`; this crate embeds the resulting object so that the agent can
//! load it with aya. The types the programs share with the agent are declared
//! in `bpf/persist.h` and mirrored in `persist_common::bpf`.

/// Bytes with the alignment an ELF parser expects.
#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

static OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/persist.bpf.o")));

/// The compiled BPF object holding the `persist_sk_lookup` program and its maps.
pub fn object() -> &'static [u8] {
    &OBJECT.0
}

/// Name of the sk_lookup program in [`object`].
pub const SK_LOOKUP_PROGRAM: &str = "persist_sk_lookup";
/// Map from local port to the service registered on it.
pub const PORTS_MAP: &str = "persist_ports";
/// Array of service states, indexed by service id.
pub const STATES_MAP: &str = "persist_states";
/// Array of per-service SYN statistics, indexed by service id.
pub const STATS_MAP: &str = "persist_stats";
/// Sockmap of the listening sockets the agent holds, indexed by service id.
pub const LISTENERS_MAP: &str = "persist_listeners";
/// Ring buffer of wake events.
pub const WAKES_MAP: &str = "persist_wakes";
