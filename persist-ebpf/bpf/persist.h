/* Types shared between the sk_lookup program and the agent.
 *
 * Mirrored by `persist_common::bpf` on the Rust side; a test there checks that
 * sizes and offsets agree. Change both together.
 */
#ifndef PERSIST_H
#define PERSIST_H

#include <linux/types.h>

#define PERSIST_MAX_SERVICES 1024
#define PERSIST_WAKE_RING_BYTES (64 * 1024)

/* Service states kept in the persist_states map. Only PARKED -> WAKING is
 * done by the kernel side; every other transition is the agent's. */
#define PERSIST_STATE_PARKED 0
#define PERSIST_STATE_WAKING 1
#define PERSIST_STATE_RUNNING 2
#define PERSIST_STATE_STOPPING 3

/* Value of persist_ports, keyed by local TCP port (host byte order). */
struct persist_port_entry {
	__u32 service_id; /* index into persist_states, persist_stats, persist_listeners */
	__u32 addr;       /* local IPv4 address in network byte order; 0 matches any */
};

/* Value of persist_stats: written by the kernel side only. */
struct persist_stats {
	__u64 syns;        /* new connections seen for the service */
	__u64 last_syn_ns; /* CLOCK_MONOTONIC of the newest SYN */
	__u64 wake_syn_ns; /* CLOCK_MONOTONIC of the SYN that last woke it */
	__u64 lost_wakes;  /* wake events the ring buffer had no room for */
};

/* Record pushed to persist_wakes when a parked service gets a SYN. */
struct persist_wake_event {
	__u32 service_id;
	__u32 _pad;
	__u64 syn_ns; /* CLOCK_MONOTONIC of the waking SYN */
};

#endif
