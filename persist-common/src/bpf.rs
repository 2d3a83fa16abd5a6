//! Types shared with the sk_lookup program, mirroring `persist-ebpf/bpf/persist.h`.
//!
//! Every struct here is `#[repr(C)]` and must match its C twin byte for byte;
//! the tests at the bottom check sizes and offsets against the values the C
//! header implies.

/// Number of service slots in the BPF maps.
pub const MAX_SERVICES: u32 = 1024;

/// Size of the wake-event ring buffer.
pub const WAKE_RING_BYTES: u32 = 64 * 1024;

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

/// Value of the `persist_ports` map, keyed by local TCP port in host byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortEntry {
    /// Slot of the service in the per-service maps.
    pub service_id: u32,
    /// Local IPv4 address in network byte order; 0 matches any address.
    pub addr: u32,
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

    #[test]
    fn layouts_match_persist_h() {
        assert_eq!(size_of::<PortEntry>(), 8);
        assert_eq!(offset_of!(PortEntry, addr), 4);
        assert_eq!(size_of::<ServiceStats>(), 32);
        assert_eq!(offset_of!(ServiceStats, last_syn_ns), 8);
        assert_eq!(offset_of!(ServiceStats, wake_syn_ns), 16);
        assert_eq!(offset_of!(ServiceStats, lost_wakes), 24);
        assert_eq!(size_of::<WakeEvent>(), 16);
        assert_eq!(offset_of!(WakeEvent, syn_ns), 8);
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
