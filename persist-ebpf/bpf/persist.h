/* Types shared between the sk_lookup program and the agent.
 *
 * Mirrored by `persist_common::bpf` on the Rust side. The layout assertions at
 * the end are checked here by the compiler and there by a test that reads
 * them from this file, so the numbers live in one place. Change both sides
 * together.
 */
#ifndef PERSIST_H
#define PERSIST_H

#include <linux/types.h>

#define PERSIST_MAX_SERVICES 16384
#define PERSIST_WAKE_RING_BYTES (256 * 1024)

/* Service states kept in the persist_states map. Only PARKED -> WAKING is
 * done by the kernel side; every other transition is the agent's. */
#define PERSIST_STATE_PARKED 0
#define PERSIST_STATE_WAKING 1
#define PERSIST_STATE_RUNNING 2
#define PERSIST_STATE_STOPPING 3

/* Address families a port entry steers (bits of persist_port_entry.families). */
#define PERSIST_FAMILY_IPV4 1
#define PERSIST_FAMILY_IPV6 2

/* Value of persist_ports, keyed by local TCP port (host byte order): the
 * SYNs the held listener would receive by itself. A dual-stack listener on
 * [::] takes both families with both addresses zero. */
struct persist_port_entry {
	__u32 service_id; /* index into persist_states, persist_stats, persist_listeners */
	__u32 families;   /* PERSIST_FAMILY_* bits */
	__u32 addr4;      /* local IPv4 address in network byte order; 0 matches any */
	__u32 addr6[4];   /* local IPv6 address in network byte order; all zero matches any */
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

/* The layout both sides rely on: one line per size or field offset. */
_Static_assert(sizeof(struct persist_port_entry) == 28, "persist_port_entry");
_Static_assert(__builtin_offsetof(struct persist_port_entry, service_id) == 0, "service_id");
_Static_assert(__builtin_offsetof(struct persist_port_entry, families) == 4, "families");
_Static_assert(__builtin_offsetof(struct persist_port_entry, addr4) == 8, "addr4");
_Static_assert(__builtin_offsetof(struct persist_port_entry, addr6) == 12, "addr6");
_Static_assert(sizeof(struct persist_stats) == 32, "persist_stats");
_Static_assert(__builtin_offsetof(struct persist_stats, syns) == 0, "syns");
_Static_assert(__builtin_offsetof(struct persist_stats, last_syn_ns) == 8, "last_syn_ns");
_Static_assert(__builtin_offsetof(struct persist_stats, wake_syn_ns) == 16, "wake_syn_ns");
_Static_assert(__builtin_offsetof(struct persist_stats, lost_wakes) == 24, "lost_wakes");
_Static_assert(sizeof(struct persist_wake_event) == 16, "persist_wake_event");
_Static_assert(__builtin_offsetof(struct persist_wake_event, service_id) == 0, "service_id");
_Static_assert(__builtin_offsetof(struct persist_wake_event, _pad) == 4, "_pad");
_Static_assert(__builtin_offsetof(struct persist_wake_event, syn_ns) == 8, "syn_ns");

#endif
