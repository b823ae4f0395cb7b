//! SCTP without kernel SCTP sockets: the lab's kernels may lack `CONFIG_IP_SCTP`, yet nftables and conntrack match
//! SCTP, so a policy's SCTP ports are tested with raw IP sockets (protocol 132). The prober sends an INIT chunk;
//! the pod's responder answers INIT-ACK (verification tag = the INIT's initiate tag, as conntrack checks); the
//! destination is reachable when the INIT-ACK comes back. Both carry a correct CRC32c (conntrack drops a packet
//! whose checksum is wrong as invalid).
//!
//! The packet code here is pure (build, parse, checksum); the sockets are in `probe.rs`.

/// IP protocol number of SCTP.
pub const IPPROTO_SCTP: i32 = 132;
/// Chunk types used.
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
/// INIT-ACK parameter carrying the state cookie (RFC 9260 §3.3.3).
const PARAM_STATE_COOKIE: u16 = 7;

/// CRC32c (Castagnoli), as SCTP and iSCSI use it.
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78;
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for b in data {
        crc = table[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Writes the checksum of `packet` (an SCTP common header and its chunks) into bytes 8..12: computed with the
/// field zeroed, stored least significant byte first (RFC 9260 appendix A).
fn seal(packet: &mut [u8]) {
    packet[8..12].fill(0);
    let c = crc32c(packet);
    packet[8..12].copy_from_slice(&c.to_le_bytes());
}

/// Whether the packet's checksum is right.
pub fn checksum_ok(packet: &[u8]) -> bool {
    if packet.len() < 12 {
        return false;
    }
    let mut copy = packet.to_vec();
    copy[8..12].fill(0);
    crc32c(&copy).to_le_bytes() == packet[8..12]
}

fn common_header(src_port: u16, dst_port: u16, vtag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

/// The fixed part shared by INIT and INIT-ACK: initiate tag, a_rwnd, streams, initial TSN.
fn init_fields(p: &mut Vec<u8>, tag: u32) {
    p.extend_from_slice(&tag.to_be_bytes());
    p.extend_from_slice(&65_535u32.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&tag.to_be_bytes());
}

/// An INIT from `src_port` to `dst_port` with initiate tag `tag` (non-zero); the verification tag of an INIT is 0.
pub fn init(src_port: u16, dst_port: u16, tag: u32) -> Vec<u8> {
    let mut p = common_header(src_port, dst_port, 0);
    p.extend_from_slice(&[CHUNK_INIT, 0]);
    p.extend_from_slice(&20u16.to_be_bytes());
    init_fields(&mut p, tag);
    seal(&mut p);
    p
}

/// The INIT-ACK answering an INIT (ports swapped, verification tag = the INIT's initiate tag), with an 8-byte
/// state cookie.
pub fn init_ack(to: &Packet, tag: u32) -> Vec<u8> {
    let mut p = common_header(to.dst_port, to.src_port, to.initiate_tag);
    let cookie = [0x75u8, 0x6c, 0x61, 0x62, 0, 0, 0, 1];
    let param_len = 4 + cookie.len() as u16;
    p.extend_from_slice(&[CHUNK_INIT_ACK, 0]);
    p.extend_from_slice(&(20 + param_len).to_be_bytes());
    init_fields(&mut p, tag);
    p.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
    p.extend_from_slice(&param_len.to_be_bytes());
    p.extend_from_slice(&cookie);
    seal(&mut p);
    p
}

/// What the lab reads of an SCTP packet: ports, verification tag, first chunk's type and initiate tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src_port: u16,
    pub dst_port: u16,
    pub vtag: u32,
    pub chunk: u8,
    /// INIT and INIT-ACK: the chunk's initiate tag; 0 otherwise.
    pub initiate_tag: u32,
}

/// Parses an SCTP packet (no IP header); `None` if it is short or its checksum is wrong.
pub fn parse(p: &[u8]) -> Option<Packet> {
    if p.len() < 16 || !checksum_ok(p) {
        return None;
    }
    let u16at = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
    let u32at = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let chunk = p[12];
    let initiate_tag = if matches!(chunk, CHUNK_INIT | CHUNK_INIT_ACK) && p.len() >= 20 {
        u32at(16)
    } else {
        0
    };
    Some(Packet {
        src_port: u16at(0),
        dst_port: u16at(2),
        vtag: u32at(4),
        chunk,
        initiate_tag,
    })
}

/// Splits a datagram a raw IPv4 socket delivers (IP header included) into source, destination and payload.
pub fn split_ipv4(d: &[u8]) -> Option<(std::net::Ipv4Addr, std::net::Ipv4Addr, &[u8])> {
    if d.len() < 20 || d[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(d[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([d[2], d[3]])).min(d.len());
    if ihl < 20 || total < ihl {
        return None;
    }
    let src = std::net::Ipv4Addr::new(d[12], d[13], d[14], d[15]);
    let dst = std::net::Ipv4Addr::new(d[16], d[17], d[18], d[19]);
    Some((src, dst, &d[ihl..total]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // The CRC catalogue's check value, and RFC 3720 B.4's 32 zero bytes / 32 0xff bytes / 0..31.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    #[test]
    fn init_and_init_ack_round_trip_with_their_tags() {
        let i = init(40_000, 80, 0xDEAD_BEEF);
        assert_eq!(i.len(), 32);
        let p = parse(&i).unwrap();
        assert_eq!(
            p,
            Packet {
                src_port: 40_000,
                dst_port: 80,
                vtag: 0,
                chunk: CHUNK_INIT,
                initiate_tag: 0xDEAD_BEEF
            }
        );
        let a = init_ack(&p, 0x0102_0304);
        let q = parse(&a).unwrap();
        assert_eq!((q.src_port, q.dst_port), (80, 40_000));
        assert_eq!(
            q.vtag, 0xDEAD_BEEF,
            "an INIT-ACK is sent with the INIT's tag"
        );
        assert_eq!(q.chunk, CHUNK_INIT_ACK);
        assert_eq!(q.initiate_tag, 0x0102_0304);
        // The chunk length counts the cookie parameter.
        assert_eq!(u16::from_be_bytes([a[14], a[15]]) as usize, a.len() - 12);
    }

    #[test]
    fn a_corrupted_packet_is_refused() {
        let mut i = init(1, 2, 3);
        i[20] ^= 1;
        assert!(parse(&i).is_none());
        assert!(parse(&i[..10]).is_none());
    }

    #[test]
    fn split_ipv4_honours_the_header_length() {
        let mut d = vec![0x46u8, 0, 0, 0];
        d.extend_from_slice(&[0; 8]);
        d.extend_from_slice(&[100, 64, 0, 2, 100, 64, 0, 3]);
        d.extend_from_slice(&[0; 4]); // options (IHL 6)
        d.extend_from_slice(&init(5, 80, 9));
        let len = d.len() as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
        let (s, t, payload) = split_ipv4(&d).unwrap();
        assert_eq!((s.octets()[3], t.octets()[3]), (2, 3));
        assert_eq!(parse(payload).unwrap().dst_port, 80);
        assert!(split_ipv4(&d[..10]).is_none());
    }
}
