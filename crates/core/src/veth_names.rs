//! Deterministic names and MAC addresses derived from the attachment (container id, interface name), so DEL,
//! CHECK and GC find the host side without any state, and a retried ADD reuses the same names. Shared by
//! `underlay-cni` (which creates the veths) and the agent (which reaps them and sweeps orphans).

/// A MAC address.
pub type Mac = [u8; 6];

/// Prefix of every host-side veth underlay-cni creates.
pub const HOST_VETH_PREFIX: &str = crate::names::HOST_VETH_PREFIX;
/// Hex digits after the prefix: `ul` + 11 = 13 characters, under the 15-character limit.
const HASH_DIGITS: usize = 11;

/// FNV-1a, 64 bits: stable across releases and platforms (unlike std's hasher), no dependency.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff; // separator: ("ab","c") and ("a","bc") differ
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in p.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The host-side veth of an attachment: `ul` + 11 hex digits.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let h = fnv1a(&[container_id, ifname]);
    format!("{HOST_VETH_PREFIX}{:011x}", h >> (64 - 4 * HASH_DIGITS))
}

/// Whether `name` has the shape of a host veth this plugin creates.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == HOST_VETH_PREFIX.len() + HASH_DIGITS
        && name.starts_with(HOST_VETH_PREFIX)
        && name[HOST_VETH_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Locally administered unicast MACs for the two ends (host, pod).
pub fn macs(container_id: &str, ifname: &str) -> (Mac, Mac) {
    let mk = |salt: &str| {
        let h = fnv1a(&[salt, container_id, ifname]).to_be_bytes();
        [0x02 | (h[0] & 0xfc), h[1], h[2], h[3], h[4], h[5]]
    };
    (mk("host"), mk("pod"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_and_distinct() {
        let a = host_veth_name("0123abcd", "eth0");
        assert_eq!(a.len(), 13);
        assert!(is_host_veth_name(&a));
        assert_eq!(a, host_veth_name("0123abcd", "eth0"));
        assert_ne!(a, host_veth_name("0123abcd", "eth1"));
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
        assert!(!is_host_veth_name("eth0"));
        assert!(!is_host_veth_name("ulzzzzzzzzzzz"));
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            assert!(seen.insert(host_veth_name(&format!("c{i}"), "eth0")));
        }
    }

    #[test]
    fn macs_are_locally_administered_unicast_and_differ() {
        let (h, p) = macs("abc", "eth0");
        assert_ne!(h, p);
        for m in [h, p] {
            assert_eq!(m[0] & 0x01, 0, "unicast");
            assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        }
    }
}
