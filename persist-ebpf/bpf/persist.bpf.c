// SPDX-License-Identifier: GPL-2.0
/* The SYN watcher: an sk_lookup program attached to a network namespace.
 *
 * For every new TCP connection in the namespace it looks the local port up in
 * persist_ports. Unregistered ports pass through after that single lookup.
 * A registered port's entry says which local addresses and families its
 * listener takes (a dual-stack [::] listener takes IPv4 SYNs too); a SYN for
 * another address passes.
 * For a registered service it counts the SYN, steers the connection to the
 * listening socket the agent holds in persist_listeners (so the kernel
 * completes the handshake and queues the connection even with no service
 * process), and, if the service is parked, flips it to waking and pushes one
 * wake event: the compare-and-swap makes a burst of SYNs wake it only once.
 */
#include <linux/bpf.h>
#include <linux/in.h>

/* From <sys/socket.h>, which cannot be included for the bpf target. */
#define AF_INET 2
#define AF_INET6 10
#include <bpf/bpf_helpers.h>

#include "persist.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PERSIST_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct persist_port_entry);
} persist_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PERSIST_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u32);
} persist_states SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PERSIST_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct persist_stats);
} persist_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, PERSIST_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u32);
} persist_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PERSIST_WAKE_RING_BYTES);
} persist_wakes SEC(".maps");

static __always_inline void wake_if_parked(__u32 id, struct persist_stats *stats, __u64 now)
{
	__u32 *state = bpf_map_lookup_elem(&persist_states, &id);
	if (!state || *state != PERSIST_STATE_PARKED)
		return;
	if (__sync_val_compare_and_swap(state, PERSIST_STATE_PARKED, PERSIST_STATE_WAKING) !=
	    PERSIST_STATE_PARKED)
		return;

	stats->wake_syn_ns = now;
	struct persist_wake_event *event = bpf_ringbuf_reserve(&persist_wakes, sizeof(*event), 0);
	if (!event) {
		/* No room: leave it parked so the next SYN tries again. */
		__sync_fetch_and_add(&stats->lost_wakes, 1);
		*state = PERSIST_STATE_PARKED;
		return;
	}
	event->service_id = id;
	event->_pad = 0;
	event->syn_ns = now;
	bpf_ringbuf_submit(event, 0);
}

/* Whether the SYN's local address is one the entry's listener receives. An
 * IPv4 SYN keeps its family here even when a dual-stack socket takes it. */
static __always_inline int local_addr_matches(const struct persist_port_entry *entry,
					      const struct bpf_sk_lookup *ctx)
{
	if (ctx->family == AF_INET)
		return (entry->families & PERSIST_FAMILY_IPV4) &&
		       (!entry->addr4 || entry->addr4 == ctx->local_ip4);
	if (ctx->family != AF_INET6 || !(entry->families & PERSIST_FAMILY_IPV6))
		return 0;
	if (!(entry->addr6[0] | entry->addr6[1] | entry->addr6[2] | entry->addr6[3]))
		return 1;
	return entry->addr6[0] == ctx->local_ip6[0] && entry->addr6[1] == ctx->local_ip6[1] &&
	       entry->addr6[2] == ctx->local_ip6[2] && entry->addr6[3] == ctx->local_ip6[3];
}

SEC("sk_lookup")
int persist_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	__u32 port = ctx->local_port;
	struct persist_port_entry *entry = bpf_map_lookup_elem(&persist_ports, &port);
	if (!entry)
		return SK_PASS;
	if (!local_addr_matches(entry, ctx))
		return SK_PASS;

	__u32 id = entry->service_id;
	struct persist_stats *stats = bpf_map_lookup_elem(&persist_stats, &id);
	if (!stats)
		return SK_PASS;

	__u64 now = bpf_ktime_get_ns();
	__sync_fetch_and_add(&stats->syns, 1);
	stats->last_syn_ns = now;
	wake_if_parked(id, stats, now);

	/* Without BPF_SK_LOOKUP_F_NO_REUSEPORT the kernel then picks the member
	 * of the listener's SO_REUSEPORT group, if it has one: one member here
	 * steers the SYN into the whole group. */
	struct bpf_sock *listener = bpf_map_lookup_elem(&persist_listeners, &id);
	if (listener) {
		bpf_sk_assign(ctx, listener, 0);
		bpf_sk_release(listener);
	}
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
