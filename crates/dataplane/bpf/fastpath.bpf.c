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
	__u32 *veth;

	if (!ip)
		return TC_ACT_OK;
	veth = bpf_map_lookup_elem(&ul_fp_pods, &ip->daddr);
	if (!veth || !inside(ip->saddr))
		return TC_ACT_OK;
	{
		__u32 target = *veth;

		if (!forward_ttl(skb, ip))
			return TC_ACT_OK;
		return bpf_redirect_peer(target, 0);
	}
}

SEC("classifier")
int ul_fp_pod(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_of(skb);
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	__u32 *own, *peer;
	__u32 saddr, daddr;
	long rc;

	if (!ip)
		return TC_ACT_OK;
	own = bpf_map_lookup_elem(&ul_fp_pods, &ip->saddr);
	if (!own || *own != skb->ingress_ifindex || !inside(ip->daddr))
		return TC_ACT_OK;
	peer = bpf_map_lookup_elem(&ul_fp_pods, &ip->daddr);
	if (peer) {
		__u32 target = *peer;

		if (!forward_ttl(skb, ip))
			return TC_ACT_OK;
		return bpf_redirect_peer(target, 0);
	}

	saddr = ip->saddr;
	daddr = ip->daddr;
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	/* 0: no MTU check here (a GSO packet's length is not its segments'); the device path checks. */
	fib.tot_len = 0;
	fib.ifindex = skb->ingress_ifindex;
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&ul_fp_uplinks, &fib.ifindex))
		return TC_ACT_OK;
	/* Re-derive the header: the FIB helper may not move data, but the verifier wants fresh bounds. */
	ip = ipv4_of(skb);
	if (!ip || !forward_ttl(skb, ip))
		return TC_ACT_OK;
	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

char _license[] SEC("license") = "GPL";
