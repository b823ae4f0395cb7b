//! Aligned prefixes of the pod CIDR counted in node blocks ("slots"), and their conversion to and from
//! [`Ipv4Net`]. Internal to the planner; everything public speaks `Ipv4Net`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Largest pod CIDR the planner accepts, in blocks (2^24 slots, e.g. a /4 of /28 blocks).
pub(crate) const MAX_ORDER: u8 = 24;

/// An aligned run of `2^order` slots starting at `start` (`start` is a multiple of `2^order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Pfx {
    pub start: u32,
    pub order: u8,
}

impl Pfx {
    pub fn of_slot(slot: u32, order: u8) -> Self {
        Self {
            start: slot & !((1u32 << order) - 1),
            order,
        }
    }
    pub fn size(self) -> u32 {
        1u32 << self.order
    }
    pub fn end(self) -> u32 {
        self.start + self.size()
    }
    /// `other` lies inside (or equals) `self`.
    pub fn contains(self, other: Pfx) -> bool {
        other.order <= self.order && other.start >= self.start && other.start < self.end()
    }
    pub fn parent(self) -> Self {
        Self::of_slot(self.start, self.order + 1)
    }
    pub fn buddy(self) -> Self {
        Self {
            start: self.start ^ self.size(),
            order: self.order,
        }
    }
    pub fn children(self) -> (Self, Self) {
        debug_assert!(self.order > 0);
        let o = self.order - 1;
        (
            Self {
                start: self.start,
                order: o,
            },
            Self {
                start: self.start + (1 << o),
                order: o,
            },
        )
    }
    /// Smallest prefix containing both.
    pub fn lca(a: Pfx, b: Pfx) -> Pfx {
        let mut p = if a.order >= b.order { a } else { b };
        let other = if a.order >= b.order { b } else { a };
        while !p.contains(other) {
            p = p.parent();
        }
        p
    }
}

/// Smallest `o` with `2^o >= n` (n ≥ 1).
pub(crate) fn ceil_log2(n: u64) -> u8 {
    if n <= 1 {
        0
    } else {
        (64 - (n - 1).leading_zeros()) as u8
    }
}

/// Maps slots of the pod CIDR to addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Space {
    pub base: u32,
    pub block_len: u8,
    pub total_order: u8,
}

impl Space {
    pub fn new(pod_cidr: Ipv4Net, block_len: u8) -> Self {
        Self {
            base: u32::from(pod_cidr.network()),
            block_len,
            total_order: block_len - pod_cidr.prefix_len(),
        }
    }
    pub fn root(self) -> Pfx {
        Pfx {
            start: 0,
            order: self.total_order,
        }
    }
    fn shift(self) -> u32 {
        32 - self.block_len as u32
    }
    pub fn net(self, p: Pfx) -> Ipv4Net {
        let addr = self
            .base
            .wrapping_add(((p.start as u64) << self.shift()) as u32);
        Ipv4Net::new(Ipv4Addr::from(addr), self.block_len - p.order)
            .expect("prefix length within 0..=32")
    }
    /// The aligned prefix for `net`, if `net` lies inside the pod CIDR and is no smaller than a block.
    pub fn pfx(self, net: Ipv4Net) -> Option<Pfx> {
        if net.prefix_len() > self.block_len || net.prefix_len() + self.total_order < self.block_len
        {
            return None;
        }
        let addr = u32::from(net.network());
        if addr < self.base {
            return None;
        }
        let off = ((addr - self.base) as u64) >> self.shift();
        if off >= (1u64 << self.total_order) {
            return None;
        }
        let order = self.block_len - net.prefix_len();
        let p = Pfx {
            start: off as u32,
            order,
        };
        (Pfx::of_slot(p.start, order) == p).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_round_trip() {
        let s = Space::new("100.64.0.0/10".parse().unwrap(), 26);
        assert_eq!(s.total_order, 16);
        let p = Pfx {
            start: 1024,
            order: 10,
        };
        let n = s.net(p);
        assert_eq!(n.to_string(), "100.65.0.0/16");
        assert_eq!(s.pfx(n), Some(p));
        assert_eq!(
            s.net(Pfx { start: 3, order: 0 }).to_string(),
            "100.64.0.192/26"
        );
        assert_eq!(s.pfx("100.128.0.0/26".parse().unwrap()), None);
        assert_eq!(s.pfx("100.64.0.0/27".parse().unwrap()), None);
        assert_eq!(s.pfx("100.0.0.0/8".parse().unwrap()), None);
    }

    #[test]
    fn prefix_relations() {
        let a = Pfx { start: 4, order: 2 };
        assert_eq!(a.parent(), Pfx { start: 0, order: 3 });
        assert_eq!(a.buddy(), Pfx { start: 0, order: 2 });
        assert_eq!(
            Pfx::lca(Pfx { start: 5, order: 0 }, Pfx { start: 8, order: 1 }),
            Pfx { start: 0, order: 4 }
        );
        assert!(a.contains(Pfx { start: 7, order: 0 }));
        assert!(!a.contains(Pfx { start: 0, order: 3 }));
        assert_eq!(ceil_log2(1), 0);
        assert_eq!(ceil_log2(105), 7);
        assert_eq!(ceil_log2(128), 7);
    }
}
