//! Types shared with the sk_lookup program, mirroring `persist-ebpf/bpf/persist.h`.
//!
//! Every struct here is `#[repr(C)]` and must match its C twin byte for byte;
//! the tests at the bottom read the header's `_Static_assert` lines (which the
//! C compiler checks too) and compare every size and offset.

use std::net::IpAddr;

/// Number of service slots in the BPF maps: services one agent holds at
/// most (each has its own port, so never more than 65,535). The maps are
/// allocated once, a few MiB for all (docs/scale.md).
pub const MAX_SERVICES: u32 = 16384;

/// Size of the wake-event ring buffer: 16,384 events of 16 bytes, a wake
/// of every slot at once.
pub const WAKE_RING_BYTES: u32 = 256 * 1024;

/// A service's state as the BPF side sees it (`persist_states` map values).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BpfState {
    /// No process serves the port: the next SYN sends a wake event.
    Parked = 0,
    /// A wake event was sent and the agent is starting the service.
    Waking = 1,
    /// The service is running.
    Running = 2,
    /// The agent is stopping the service.
    Stopping = 3,
}

impl BpfState {
    /// Decodes a raw map value; unknown values are `None`.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Parked),
            1 => Some(Self::Waking),
            2 => Some(Self::Running),
            3 => Some(Self::Stopping),
            _ => None,
        }
    }
}

/// [`PortEntry::families`] bit: the entry steers IPv4 SYNs.
pub const FAMILY_IPV4: u32 = 1;

/// [`PortEntry::families`] bit: the entry steers IPv6 SYNs.
pub const FAMILY_IPV6: u32 = 2;

/// Value of the `persist_ports` map, keyed by local TCP port in host byte
/// order: which SYNs for the port go to the service's listener.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortEntry {
    /// Slot of the service in the per-service maps.
    pub service_id: u32,
    /// The address families steered: [`FAMILY_IPV4`] and [`FAMILY_IPV6`] bits.
    pub families: u32,
    /// Local IPv4 address in network byte order; 0 matches any address.
    pub addr4: u32,
    /// Local IPv6 address in network byte order; all zero matches any address.
    pub addr6: [u32; 4],
}

impl PortEntry {
    /// The entry for a listener bound to `local`: it steers exactly the SYNs
    /// the listener would receive by itself. `v6only` is the listener's
    /// `IPV6_V6ONLY` option: a listener on `::` without it is dual-stack
    /// and takes IPv4 too. An IPv4-mapped address (`::ffff:a.b.c.d`)
    /// receives only IPv4.
    pub fn for_listener(service_id: u32, local: IpAddr, v6only: bool) -> Self {
        let mut entry = Self {
            service_id,
            ..Self::default()
        };
        match local.to_canonical() {
            IpAddr::V4(v4) => {
                entry.families = FAMILY_IPV4;
                entry.addr4 = u32::from_ne_bytes(v4.octets());
            }
            IpAddr::V6(v6) => {
                entry.families = FAMILY_IPV6;
                if v6.is_unspecified() && !v6only {
                    entry.families |= FAMILY_IPV4;
                }
                let octets = v6.octets();
                for (word, bytes) in entry.addr6.iter_mut().zip(octets.chunks_exact(4)) {
                    *word = u32::from_ne_bytes(bytes.try_into().expect("chunks of 4"));
                }
            }
        }
        entry
    }
}

/// Value of the `persist_stats` map: written by the BPF program only.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// New connections seen for the service.
    pub syns: u64,
    /// CLOCK_MONOTONIC nanoseconds of the newest SYN.
    pub last_syn_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds of the SYN that last woke the service.
    pub wake_syn_ns: u64,
    /// Wake events dropped because the ring buffer was full.
    pub lost_wakes: u64,
}

/// Record the BPF program pushes to `persist_wakes` when a parked service gets a SYN.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WakeEvent {
    /// Slot of the service to wake.
    pub service_id: u32,
    /// Padding, always zero.
    pub pad: u32,
    /// CLOCK_MONOTONIC nanoseconds of the waking SYN.
    pub syn_ns: u64,
}

impl WakeEvent {
    /// Decodes an event from the bytes of a ring-buffer record.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        Some(Self {
            service_id: u32::from_ne_bytes(bytes[0..4].try_into().ok()?),
            pad: 0,
            syn_ns: u64::from_ne_bytes(bytes[8..16].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// The C header, whose `_Static_assert` lines give the layout.
    const PERSIST_H: &str = include_str!("../../persist-ebpf/bpf/persist.h");

    /// Size (`field` = None) or field offset of a C struct, as Rust lays out its twin.
    fn rust_layout(c_struct: &str, field: Option<&str>) -> Option<usize> {
        Some(match (c_struct, field) {
            ("persist_port_entry", None) => size_of::<PortEntry>(),
            ("persist_port_entry", Some("service_id")) => offset_of!(PortEntry, service_id),
            ("persist_port_entry", Some("families")) => offset_of!(PortEntry, families),
            ("persist_port_entry", Some("addr4")) => offset_of!(PortEntry, addr4),
            ("persist_port_entry", Some("addr6")) => offset_of!(PortEntry, addr6),
            ("persist_stats", None) => size_of::<ServiceStats>(),
            ("persist_stats", Some("syns")) => offset_of!(ServiceStats, syns),
            ("persist_stats", Some("last_syn_ns")) => offset_of!(ServiceStats, last_syn_ns),
            ("persist_stats", Some("wake_syn_ns")) => offset_of!(ServiceStats, wake_syn_ns),
            ("persist_stats", Some("lost_wakes")) => offset_of!(ServiceStats, lost_wakes),
            ("persist_wake_event", None) => size_of::<WakeEvent>(),
            ("persist_wake_event", Some("service_id")) => offset_of!(WakeEvent, service_id),
            ("persist_wake_event", Some("_pad")) => offset_of!(WakeEvent, pad),
            ("persist_wake_event", Some("syn_ns")) => offset_of!(WakeEvent, syn_ns),
            _ => return None,
        })
    }

    /// Parses `_Static_assert(sizeof(struct S) == N, ...)` and
    /// `_Static_assert(__builtin_offsetof(struct S, F) == N, ...)`.
    fn parse_assert(line: &str) -> Option<(&str, Option<&str>, usize)> {
        let body = line.strip_prefix("_Static_assert(")?;
        let (lhs, rhs) = body.split_once(" == ")?;
        let value: usize = rhs.split(',').next()?.trim().parse().ok()?;
        if let Some(name) = lhs.strip_prefix("sizeof(struct ") {
            return Some((name.strip_suffix(')')?, None, value));
        }
        let inner = lhs
            .strip_prefix("__builtin_offsetof(struct ")?
            .strip_suffix(')')?;
        let (name, field) = inner.split_once(", ")?;
        Some((name, Some(field), value))
    }

    #[test]
    fn layouts_match_persist_h() {
        let asserts: Vec<_> = PERSIST_H
            .lines()
            .filter(|line| line.starts_with("_Static_assert("))
            .map(|line| parse_assert(line).unwrap_or_else(|| panic!("unparsed: {line}")))
            .collect();
        assert_eq!(
            asserts.len(),
            14,
            "persist.h should state 3 sizes and 11 offsets"
        );
        for (c_struct, field, expected) in asserts {
            let what = format!("{c_struct} {}", field.unwrap_or("size"));
            let actual = rust_layout(c_struct, field)
                .unwrap_or_else(|| panic!("{what} in persist.h has no Rust twin"));
            assert_eq!(
                actual, expected,
                "{what}: Rust says {actual}, persist.h {expected}"
            );
        }
    }

    #[test]
    fn constants_match_persist_h() {
        let define = |name: &str| {
            PERSIST_H
                .lines()
                .find_map(|line| line.strip_prefix(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("persist.h defines no {name}"))
                .trim()
                .to_owned()
        };
        assert_eq!(define("PERSIST_MAX_SERVICES"), MAX_SERVICES.to_string());
        assert_eq!(
            define("PERSIST_WAKE_RING_BYTES"),
            format!("({} * 1024)", WAKE_RING_BYTES / 1024)
        );
        assert_eq!(define("PERSIST_FAMILY_IPV4"), FAMILY_IPV4.to_string());
        assert_eq!(define("PERSIST_FAMILY_IPV6"), FAMILY_IPV6.to_string());
        for (name, state) in [
            ("PERSIST_STATE_PARKED", BpfState::Parked),
            ("PERSIST_STATE_WAKING", BpfState::Waking),
            ("PERSIST_STATE_RUNNING", BpfState::Running),
            ("PERSIST_STATE_STOPPING", BpfState::Stopping),
        ] {
            assert_eq!(define(name), (state as u32).to_string(), "{name}");
        }
    }

    #[test]
    fn port_entries_steer_what_the_listener_receives() {
        let v4 = PortEntry::for_listener(3, "127.0.0.1".parse().unwrap(), false);
        assert_eq!(v4.service_id, 3);
        assert_eq!(v4.families, FAMILY_IPV4);
        assert_eq!(v4.addr4.to_ne_bytes(), [127, 0, 0, 1], "network byte order");
        assert_eq!(v4.addr6, [0; 4]);

        let any4 = PortEntry::for_listener(0, "0.0.0.0".parse().unwrap(), false);
        assert_eq!((any4.families, any4.addr4), (FAMILY_IPV4, 0));

        let loopback6 = PortEntry::for_listener(0, "::1".parse().unwrap(), false);
        assert_eq!(loopback6.families, FAMILY_IPV6, "::1 takes no IPv4");
        assert_eq!(loopback6.addr6[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(loopback6.addr6[..3], [0; 3]);

        let dual = PortEntry::for_listener(0, "::".parse().unwrap(), false);
        assert_eq!(dual.families, FAMILY_IPV4 | FAMILY_IPV6, ":: is dual-stack");
        assert_eq!((dual.addr4, dual.addr6), (0, [0; 4]));

        let v6only = PortEntry::for_listener(0, "::".parse().unwrap(), true);
        assert_eq!(v6only.families, FAMILY_IPV6, "IPV6_V6ONLY takes no IPv4");

        let mapped = PortEntry::for_listener(0, "::ffff:10.1.2.3".parse().unwrap(), false);
        assert_eq!(mapped.families, FAMILY_IPV4, "a mapped address is IPv4");
        assert_eq!(mapped.addr4.to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn wake_event_decodes_its_own_bytes() {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&7u32.to_ne_bytes());
        bytes[8..16].copy_from_slice(&123_456u64.to_ne_bytes());
        let event = WakeEvent::from_bytes(&bytes).expect("16 bytes decode");
        assert_eq!(event.service_id, 7);
        assert_eq!(event.syn_ns, 123_456);
        assert!(WakeEvent::from_bytes(&bytes[..15]).is_none());
    }
}

#[cfg(feature = "aya")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding and no invalid bit
    // patterns, so any byte string of its size is a value.
    unsafe impl aya::Pod for super::PortEntry {}
    // SAFETY: as for `PortEntry`.
    unsafe impl aya::Pod for super::ServiceStats {}
    // SAFETY: as for `PortEntry` (the padding is an explicit field).
    unsafe impl aya::Pod for super::WakeEvent {}
}
