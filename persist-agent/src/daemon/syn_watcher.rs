//! The BPF side as the daemon sees it: loads the sk_lookup program, attaches
//! it to the daemon's network namespace, and keeps the per-service maps.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, RingBuf, SockMap};
use aya::programs::SkLookup;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use persist_common::bpf::{BpfState, MAX_SERVICES, PortEntry, ServiceStats, WakeEvent};
use persist_ebpf as objects;

/// Why the BPF side could not be set up or updated.
#[derive(Debug, thiserror::Error)]
pub enum SynWatcherError {
    /// Loading the object or program failed.
    #[error("loading the sk_lookup program: {0}")]
    Load(String),
    /// Attaching to the network namespace failed.
    #[error("attaching sk_lookup to the network namespace: {0}")]
    Attach(String),
    /// A map update failed.
    #[error("updating BPF map {map} for service slot {slot}: {message}")]
    Map {
        /// The map.
        map: &'static str,
        /// The service slot.
        slot: u32,
        /// The error.
        message: String,
    },
    /// The listener's address could not be read.
    #[error("reading the address of service slot {slot}'s listener")]
    Listener {
        /// The service slot.
        slot: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The ring buffer could not be polled.
    #[error("polling the wake ring buffer: {0}")]
    Poll(#[from] std::io::Error),
}

/// The loaded and attached program with its maps.
pub struct SynWatcher {
    ports: HashMap<MapData, u32, PortEntry>,
    states: Array<MapData, u32>,
    stats: Array<MapData, ServiceStats>,
    listeners: SockMap<MapData>,
    // Dropping the object detaches the program; it must outlive the maps' use.
    _ebpf: Ebpf,
}

/// The wake-event stream, read by one task.
pub struct WakeEvents {
    ring: RingBuf<MapData>,
}

impl SynWatcher {
    /// Loads the program and attaches it to the calling thread's network namespace.
    pub fn attach() -> Result<(Self, WakeEvents), SynWatcherError> {
        let load = |e: &dyn std::fmt::Display| SynWatcherError::Load(e.to_string());
        let mut ebpf = Ebpf::load(objects::object()).map_err(|e| load(&e))?;
        let program: &mut SkLookup = ebpf
            .program_mut(objects::SK_LOOKUP_PROGRAM)
            .ok_or_else(|| load(&"program missing from the object"))?
            .try_into()
            .map_err(|e| load(&e))?;
        program.load().map_err(|e| load(&e))?;
        let netns =
            File::open("/proc/self/ns/net").map_err(|e| SynWatcherError::Attach(e.to_string()))?;
        program
            .attach(netns.as_fd())
            .map_err(|e| SynWatcherError::Attach(e.to_string()))?;

        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| load(&format!("map {name} missing from the object")))
        };
        let ports = HashMap::try_from(take(objects::PORTS_MAP)?).map_err(|e| load(&e))?;
        let states = Array::try_from(take(objects::STATES_MAP)?).map_err(|e| load(&e))?;
        let stats = Array::try_from(take(objects::STATS_MAP)?).map_err(|e| load(&e))?;
        let listeners = SockMap::try_from(take(objects::LISTENERS_MAP)?).map_err(|e| load(&e))?;
        let ring = RingBuf::try_from(take(objects::WAKES_MAP)?).map_err(|e| load(&e))?;
        Ok((
            Self {
                ports,
                states,
                stats,
                listeners,
                _ebpf: ebpf,
            },
            WakeEvents { ring },
        ))
    }

    /// Registers a service in `slot`: its listener, a parked state, zeroed
    /// counters, and last its port, which makes the program see it. The
    /// program steers the SYNs the listener itself would receive: those for
    /// its address and family, both families for a dual-stack `::`.
    pub fn register(
        &mut self,
        slot: u32,
        port: u16,
        listener: &(impl AsRawFd + AsFd),
    ) -> Result<(), SynWatcherError> {
        let (local, v6only) = super::listener::bound_address(listener)
            .map_err(|source| SynWatcherError::Listener { slot, source })?;
        let map_err = |map, e: &dyn std::fmt::Display| SynWatcherError::Map {
            map,
            slot,
            message: e.to_string(),
        };
        self.stats
            .set(slot, ServiceStats::default(), 0)
            .map_err(|e| map_err(objects::STATS_MAP, &e))?;
        self.set_state(slot, BpfState::Parked)?;
        self.listeners
            .set(slot, listener, 0)
            .map_err(|e| map_err(objects::LISTENERS_MAP, &e))?;
        let entry = PortEntry::for_listener(slot, local.ip(), v6only);
        self.ports
            .insert(u32::from(port), entry, 0)
            .map_err(|e| map_err(objects::PORTS_MAP, &e))
    }

    /// Forgets the service in `slot`: its port first, so no SYN finds it half-removed.
    pub fn unregister(&mut self, slot: u32, port: u16) {
        let _ = self.ports.remove(&u32::from(port));
        let _ = self.listeners.clear_index(&slot);
        let _ = self.states.set(slot, BpfState::Parked as u32, 0);
    }

    /// Replaces the listening socket the program steers `slot`'s SYNs to.
    pub fn set_listener(
        &mut self,
        slot: u32,
        listener: &impl AsRawFd,
    ) -> Result<(), SynWatcherError> {
        self.listeners
            .set(slot, listener, 0)
            .map_err(|e| SynWatcherError::Map {
                map: objects::LISTENERS_MAP,
                slot,
                message: e.to_string(),
            })
    }

    /// Sets the state the program sees for `slot`.
    pub fn set_state(&mut self, slot: u32, state: BpfState) -> Result<(), SynWatcherError> {
        self.states
            .set(slot, state as u32, 0)
            .map_err(|e| SynWatcherError::Map {
                map: objects::STATES_MAP,
                slot,
                message: e.to_string(),
            })
    }

    /// The state the program sees for `slot`.
    pub fn state(&self, slot: u32) -> Option<BpfState> {
        self.states.get(&slot, 0).ok().and_then(BpfState::from_raw)
    }

    /// The SYN counters of `slot`.
    pub fn stats(&self, slot: u32) -> ServiceStats {
        self.stats.get(&slot, 0).unwrap_or_default()
    }

    /// Number of service slots.
    pub fn capacity(&self) -> u32 {
        MAX_SERVICES
    }
}

impl WakeEvents {
    /// Waits (blocking the thread) for the next batch of wake events.
    pub fn next_batch(&mut self) -> Result<Vec<WakeEvent>, SynWatcherError> {
        loop {
            let mut events = Vec::new();
            while let Some(item) = self.ring.next() {
                events.extend(WakeEvent::from_bytes(&item));
            }
            if !events.is_empty() {
                return Ok(events);
            }
            // Level-triggered: an event written after the drain above wakes
            // this poll at once.
            let mut fds = [PollFd::new(self.ring.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(SynWatcherError::Poll(errno.into())),
            }
        }
    }
}
