//! Address and port intervals: what nftables interval sets hold. Elements of one set never overlap (the
//! kernel rejects overlapping intervals), so unions are merged here.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// An inclusive IPv4 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AddrRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl AddrRange {
    pub fn new(start: Ipv4Addr, end: Ipv4Addr) -> Self {
        Self { start, end }
    }

    pub fn single(ip: Ipv4Addr) -> Self {
        Self { start: ip, end: ip }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.start <= ip && ip <= self.end
    }

    /// The nft spelling: `a.b.c.d`, `a.b.c.d/len` when the range is a prefix, else `a-b`.
    pub fn render(&self) -> String {
        let (s, e) = (u32::from(self.start), u32::from(self.end));
        if s == e {
            return self.start.to_string();
        }
        let size = u64::from(e) - u64::from(s) + 1;
        if size.is_power_of_two() && u64::from(s) % size == 0 {
            let len = 32 - size.trailing_zeros();
            return format!("{}/{len}", self.start);
        }
        format!("{}-{}", self.start, self.end)
    }
}

/// `whole` minus `holes`, as sorted disjoint ranges.
pub fn subtract(whole: AddrRange, holes: &[AddrRange]) -> Vec<AddrRange> {
    let mut holes: Vec<(u32, u32)> = holes
        .iter()
        .map(|h| (u32::from(h.start), u32::from(h.end)))
        .collect();
    holes.sort();
    let (mut cur, end) = (
        u64::from(u32::from(whole.start)),
        u64::from(u32::from(whole.end)),
    );
    let mut out = Vec::new();
    for (hs, he) in holes {
        let (hs, he) = (u64::from(hs), u64::from(he));
        if he < cur || hs > end {
            continue;
        }
        if hs > cur {
            out.push(mk(cur, hs - 1));
        }
        cur = cur.max(he + 1);
        if cur > end {
            return out;
        }
    }
    if cur <= end {
        out.push(mk(cur, end));
    }
    out
}

fn mk(a: u64, b: u64) -> AddrRange {
    AddrRange::new(Ipv4Addr::from(a as u32), Ipv4Addr::from(b as u32))
}

/// Merges overlapping (not merely adjacent) ranges, so each element of a set is stable when a neighbour
/// address comes and goes.
pub fn merge_overlapping<T: Ord + Copy>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => {
                if e > last.1 {
                    last.1 = e;
                }
            }
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: &str, b: &str) -> AddrRange {
        AddrRange::new(a.parse().unwrap(), b.parse().unwrap())
    }

    #[test]
    fn subtract_cuts_holes_and_clips() {
        let w = r("10.0.0.0", "10.0.0.255");
        assert_eq!(
            subtract(w, &[r("10.0.0.16", "10.0.0.31"), r("9.0.0.0", "10.0.0.3")]),
            vec![r("10.0.0.4", "10.0.0.15"), r("10.0.0.32", "10.0.0.255")]
        );
        assert_eq!(subtract(w, &[r("0.0.0.0", "255.255.255.255")]), vec![]);
        let all = r("0.0.0.0", "255.255.255.255");
        assert_eq!(
            subtract(all, &[r("255.255.255.255", "255.255.255.255")]),
            vec![r("0.0.0.0", "255.255.255.254")]
        );
    }

    #[test]
    fn render_prefers_prefixes() {
        assert_eq!(r("10.0.0.0", "10.0.0.255").render(), "10.0.0.0/24");
        assert_eq!(r("10.0.0.1", "10.0.0.1").render(), "10.0.0.1");
        assert_eq!(r("10.0.0.1", "10.0.0.2").render(), "10.0.0.1-10.0.0.2");
        assert_eq!(r("0.0.0.0", "255.255.255.255").render(), "0.0.0.0/0");
    }

    #[test]
    fn merge_keeps_adjacent_apart() {
        assert_eq!(
            merge_overlapping(vec![(5, 9), (1, 4), (3, 6), (10, 10)]),
            vec![(1, 9), (10, 10)]
        );
    }
}
