// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
/*
 * underlay's tc-BPF fast path (IPv4). Two programs, both on tc ingress, both falling back to the kernel's
 * own path (TC_ACT_OK) whenever anything is not known to be safe to skip:
 *
 *   ul_fp_uplink  on the node's uplinks (the primary ENI; in eni mode every ENI device):
 *                 a packet from inside the VPC or the pod CIDR to a local pod in ul_fp_pods
 *                 -> bpf_redirect_peer into that pod's namespace (no routing, no backlog queue).
 *   ul_fp_pod     on each pod's host-side veth (packets the pod sends):
 *                 source is the pod that owns this veth (ul_fp_pods says so), destination inside the VPC or
 *                 the pod CIDR, and
 *                   - a local pod in ul_fp_pods          -> bpf_redirect_peer into its namespace;
 *                   - else the kernel's FIB (policy rules included, so eni mode's "from pod -> its ENI's
 *                     table") resolves the next hop out of an uplink in ul_fp_uplinks
 *                                                        -> bpf_redirect_neigh out of that device.
 *
 *   ul_fp_to_pod  on each pod's host-side veth, egress: every packet it sees reached the pod by the kernel's
 *                 path (redirect_peer skips it), so it records the pod's end of that flow in ul_fp_kflows.
 *
 * Flows the kernel carries stay with the kernel: ul_fp_kflows holds (pod address, pod port, protocol) of
 * every flow a packet of which took the kernel path, in either direction, with the time last seen; a packet
 * whose pod end is there (and fresh) is not fast-pathed. So a flow the kernel translated (a Service's DNAT
 * by kube-proxy, a hostPort, a NodePort) keeps meeting conntrack both ways, and a flow that began on the
 * kernel path (before a pod was in ul_fp_pods) stays there. Fragments always take the kernel path.
 *
 * ul_fp_pods holds only pods that no NetworkPolicy selects in either direction (the agent keeps it so, and
 * removes a pod before its policy state is committed): for every other pod, and for every destination outside
 * ul_fp_inside (the instance metadata service, the internet: SNAT and the IMDS guard live in nftables), the
 * packet takes the kernel path with netfilter. The TTL is decremented as the kernel's forwarding would.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

/* Local pod address (network byte order) -> ifindex of its host-side veth. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 4096);
} ul_fp_pods SEC(".maps");

struct inside_key {
	__u32 prefixlen;
	__u32 addr;
};

/* The VPC's CIDRs and the pod CIDR: the only destinations (and uplink sources) the fast path serves. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct inside_key);
	__type(value, __u8);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ul_fp_inside SEC(".maps");

/* Ifindexes a pod's packet may be sent out of by bpf_redirect_neigh (the node's uplinks). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u8);
	__uint(max_entries, 64);
} ul_fp_uplinks SEC(".maps");

/* A pod's end of a flow: its address, its port (0 for protocols without ports) and the protocol. */
struct flow_key {
	__u32 pod;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* Pod ends of flows the kernel carries -> bpf_ktime_get_ns() of their last kernel-path packet. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow_key);
	__type(value, __u64);
	__uint(max_entries, 65536);
} ul_fp_kflows SEC(".maps");

/* How long a flow stays with the kernel after its last kernel-path packet. */
#define KFLOW_TTL_NS (3600ULL * 1000000000ULL)

static __always_inline struct iphdr *ipv4_of(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end)
		return NULL;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 || ip->ihl < 5)
		return NULL;
	return ip;
}

/* The flow key of the pod end `pod` (the source when `src`, else the destination); 0 for a fragment. */
static __always_inline int flow_of(struct __sk_buff *skb, struct iphdr *ip, int src, struct flow_key *k)
{
	void *data_end = (void *)(long)skb->data_end;
	__u16 *ports = (void *)ip + ip->ihl * 4;

	if (ip->frag_off & bpf_htons(0x3fff))
		return 0;
	k->pod = src ? ip->saddr : ip->daddr;
	k->proto = ip->protocol;
	k->pad = 0;
	k->port = 0;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) {
		if ((void *)(ports + 2) > data_end)
			return 0;
		k->port = src ? ports[0] : ports[1];
	}
	return 1;
}

/* Records a kernel-path packet of the flow `k`. */
static __always_inline void kflow_touch(struct flow_key *k)
{
	__u64 now = bpf_ktime_get_ns();

	bpf_map_update_elem(&ul_fp_kflows, k, &now, BPF_ANY);
}

/* Whether the flow `k` is the kernel's: seen on the kernel path within the TTL (and then refreshed). */
static __always_inline int kflow_live(struct flow_key *k)
{
	__u64 *seen = bpf_map_lookup_elem(&ul_fp_kflows, k);
	__u64 now;

	if (!seen)
		return 0;
	now = bpf_ktime_get_ns();
	if (now - *seen > KFLOW_TTL_NS)
		return 0;
	*seen = now;
	return 1;
}

static __always_inline int inside(__u32 addr)
{
	struct inside_key k = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(&ul_fp_inside, &k) != NULL;
}

/* Decrements the TTL as forwarding would; 0 when the packet must go to the kernel (which sends the ICMP). */
static __always_inline int forward_ttl(struct __sk_buff *skb, struct iphdr *ip)
{
	__u16 old, new;

	if (ip->ttl <= 1)
		return 0;
	old = *(__u16 *)&ip->ttl;
	ip->ttl--;
	new = *(__u16 *)&ip->ttl;
	bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old, new, 2);
	return 1;
}

SEC("classifier")
int ul_fp_uplink(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_of(skb);
	struct flow_key k;
	__u32 *veth;

	if (!ip)
		return TC_ACT_OK;
	veth = bpf_map_lookup_elem(&ul_fp_pods, &ip->daddr);
	if (!veth || !inside(ip->saddr))
		return TC_ACT_OK;
	if (!flow_of(skb, ip, 0, &k) || kflow_live(&k))
		return TC_ACT_OK;
	{
		__u32 target = *veth;

		if (!forward_ttl(skb, ip))
			return TC_ACT_OK;
		return bpf_redirect_peer(target, 0);
	}
}

/* The fast-path verdict of a packet from a pod (TC_ACT_OK: the kernel's path). */
static __always_inline long from_pod(struct __sk_buff *skb, struct iphdr *ip, struct flow_key *own_flow)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	struct flow_key peer_flow;
	__u32 *own, *peer;
	long rc;

	own = bpf_map_lookup_elem(&ul_fp_pods, &ip->saddr);
	if (!own || *own != skb->ingress_ifindex || !inside(ip->daddr))
		return TC_ACT_OK;
	if (kflow_live(own_flow))
		return TC_ACT_OK;
	peer = bpf_map_lookup_elem(&ul_fp_pods, &ip->daddr);
	if (peer) {
		__u32 target = *peer;

		if (!flow_of(skb, ip, 0, &peer_flow) || kflow_live(&peer_flow))
			return TC_ACT_OK;
		if (!forward_ttl(skb, ip))
			return TC_ACT_OK;
		return bpf_redirect_peer(target, 0);
	}

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	/* 0: no MTU check here (a GSO packet's length is not its segments'); the device path checks. */
	fib.tot_len = 0;
	fib.ifindex = skb->ingress_ifindex;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&ul_fp_uplinks, &fib.ifindex))
		return TC_ACT_OK;
	/* Re-derive the header: the verifier wants fresh bounds after a helper call. */
	ip = ipv4_of(skb);
	if (!ip || !forward_ttl(skb, ip))
		return TC_ACT_OK;
	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

SEC("classifier")
int ul_fp_pod(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_of(skb);
	struct flow_key own_flow;
	long verdict;

	if (!ip || !flow_of(skb, ip, 1, &own_flow))
		return TC_ACT_OK;
	verdict = from_pod(skb, ip, &own_flow);
	if (verdict == TC_ACT_OK)
		kflow_touch(&own_flow);
	return verdict;
}

SEC("classifier")
int ul_fp_to_pod(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_of(skb);
	struct flow_key k;

	if (ip && flow_of(skb, ip, 0, &k))
		kflow_touch(&k);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
