//! A small byte mutator for the stable harness: a seed from the corpus, changed by a list of operations that
//! proptest generates (and shrinks), with a dictionary of the tokens the parsers care about.

/// One change to an input. Positions and lengths wrap around the input's length.
#[derive(Debug, Clone)]
pub enum Op {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        byte: u8,
    },
    InsertToken {
        at: usize,
        token: usize,
    },
    ReplaceWithToken {
        at: usize,
        len: usize,
        token: usize,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Duplicate {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// Inserts `len` bytes of another seed, from `from`.
    Splice {
        at: usize,
        other: usize,
        from: usize,
        len: usize,
    },
}

/// Tokens worth inserting: JSON/YAML syntax, the keys the schemas use, edge numbers and addresses.
pub const DICTIONARY: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\n",
    "\n\n",
    " ",
    "-",
    ".",
    "/",
    "=",
    ";",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e999",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "0.0",
    "\"\"",
    "\\u0000",
    "\\ud800",
    "~",
    "&a",
    "*a",
    "!!binary",
    "---",
    "? ",
    "<<: ",
    "0.0.0.0/0",
    "255.255.255.255/32",
    "100.64.0.0/10",
    "100.64.1.0/26",
    "198.18.0.0/15",
    "100.64.1.5",
    "169.254.1.1",
    "1.2.3.4/33",
    "::1",
    "02:aa:00:00:00:01",
    "cniVersion",
    "\"1.1.0\"",
    "\"1.0.0\"",
    "\"0.4.0\"",
    "prevResult",
    "interfaces",
    "ips",
    "sandbox",
    "interface",
    "cni.dev/valid-attachments",
    "containerID",
    "ifname",
    "mtu",
    "ipam",
    "logLevel",
    "plugins",
    "CNI_COMMAND=",
    "CNI_CONTAINERID=",
    "CNI_IFNAME=",
    "CNI_NETNS=",
    "CNI_ARGS=",
    "ADD",
    "DEL",
    "CHECK",
    "GC",
    "STATUS",
    "VERSION",
    "version",
    "allocations",
    "cooling",
    "cursor",
    "until_unix_ms",
    "egress",
    "route_table",
    "container_id",
    "pool",
    "block",
    "addresses",
    "egress_interface",
    "cooldown_secs",
    "pod_block",
    "pod_cidr",
    "vpc_cidrs",
    "peer_routes",
    "node_ip",
    "spec",
    "status",
    "metadata",
    "mode",
    "routed",
    "eni",
    "nodeIP",
    "enis",
    "prefixes",
    "subnetCidr",
    "deviceIndex",
    "mac",
    "primaryIp",
    "releasingAddresses",
    "routes",
    "via",
    "destination",
    "cluster",
    "block_prefix_len",
    "headroom",
    "vpc",
    "subnets",
    "route_tables",
    "route_limit",
    "foreign_routes",
    "nodes",
    "healthy",
];

/// [`DICTIONARY`] in libFuzzer's `-dict` format (one quoted token a line), as checked in at `fuzz/underlay.dict`.
pub fn libfuzzer_dict() -> String {
    let mut out = String::from(
        "# Generated from crates/fuzz/src/mutate.rs (DICTIONARY); a test keeps them equal.\n",
    );
    for token in DICTIONARY {
        out.push('"');
        for b in token.bytes() {
            match b {
                b'"' | b'\\' => {
                    out.push('\\');
                    out.push(b as char);
                }
                b' '..=b'~' => out.push(b as char),
                _ => out.push_str(&format!("\\x{b:02X}")),
            }
        }
        out.push_str("\"\n");
    }
    out
}

fn wrap(at: usize, len: usize) -> usize {
    if len == 0 { 0 } else { at % (len + 1) }
}

/// `seed` changed by `ops`; `others` are the seeds `Splice` draws from.
pub fn apply(seed: &[u8], ops: &[Op], others: &[&[u8]]) -> Vec<u8> {
    let mut buf = seed.to_vec();
    for op in ops {
        let n = buf.len();
        match *op {
            Op::FlipBit { at, bit } => {
                if n > 0 {
                    buf[at % n] ^= 1 << (bit % 8);
                }
            }
            Op::SetByte { at, byte } => {
                if n > 0 {
                    buf[at % n] = byte;
                }
            }
            Op::InsertToken { at, token } => {
                let t = DICTIONARY[token % DICTIONARY.len()].as_bytes();
                let at = wrap(at, n);
                buf.splice(at..at, t.iter().copied());
            }
            Op::ReplaceWithToken { at, len, token } => {
                let t = DICTIONARY[token % DICTIONARY.len()].as_bytes();
                let at = wrap(at, n);
                let end = (at + len % 16).min(n);
                buf.splice(at..end, t.iter().copied());
            }
            Op::Delete { at, len } => {
                let at = wrap(at, n);
                let end = (at + len % 64).min(n);
                buf.drain(at..end);
            }
            Op::Duplicate { at, len } => {
                let at = wrap(at, n);
                let end = (at + len % 64).min(n);
                let part = buf[at..end].to_vec();
                buf.splice(at..at, part);
            }
            Op::Truncate { at } => buf.truncate(wrap(at, n)),
            Op::Splice {
                at,
                other,
                from,
                len,
            } => {
                if let Some(o) = (!others.is_empty()).then(|| others[other % others.len()]) {
                    let from = wrap(from, o.len());
                    let end = (from + len % 256).min(o.len());
                    let at = wrap(at, n);
                    buf.splice(at..at, o[from..end].iter().copied());
                }
            }
        }
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_libfuzzer_dictionary_is_the_dictionary() {
        let path = crate::corpus_root().join("../underlay.dict");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == libfuzzer_dict(),
            "{} is out of date; write libfuzzer_dict() to it",
            path.display()
        );
    }

    #[test]
    fn operations_wrap_and_change_the_seed() {
        let seed = b"{\"a\":1}";
        assert_eq!(apply(seed, &[], &[]), seed);
        assert_eq!(apply(seed, &[Op::Truncate { at: 3 }], &[]), b"{\"a");
        assert_eq!(apply(b"", &[Op::FlipBit { at: 9, bit: 1 }], &[]), b"");
        let spliced = apply(
            b"xy",
            &[Op::Splice {
                at: 1,
                other: 0,
                from: 0,
                len: 3,
            }],
            &[b"abcdef"],
        );
        assert_eq!(spliced, b"xabcy");
        let inserted = apply(b"", &[Op::InsertToken { at: 0, token: 0 }], &[]);
        assert_eq!(inserted, b"{");
    }
}
