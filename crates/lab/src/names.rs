//! Every name the lab gives a kernel object, derived deterministically from the lab id and the EC2 ids.
//!
//! ```text
//!   namespaces  ul-<lab>-fab   ul-<lab>-inet   ul-<lab>-<instance id>
//!   fabric      <lab>-s<tail of subnet id>   (a bridge per subnet)
//!               <lab>-e<tail of ENI id>      (fabric end of an ENI's veth, a port of its subnet's bridge)
//!               <lab>-igw                    (veth to the internet namespace)
//!   instance    eth<device index>            (the ENI, with its MAC)
//! ```
//!
//! Link names must fit IFNAMSIZ (15 bytes): a lab id has at most 6 characters, leaving at least 7 hex digits
//! of the EC2 id. vpcsim and EC2 draw ids at random, so a clash is rare; the planner refuses one rather than
//! guess ([`crate::PlanError::NameClash`]).

use underlay_cloud::{EniId, InstanceId, RouteTableId, SubnetId};
use underlay_core::names::{LAB_NETNS_PREFIX, LAB_TABLE_VPC_BASE};

use crate::Error;

/// Longest interface name Linux accepts (IFNAMSIZ minus the terminating NUL).
pub const IFNAME_MAX: usize = 15;
/// Longest lab id.
pub const LAB_ID_MAX: usize = 6;

/// A validated lab id: 1 to 6 characters, `a-z` and `0-9`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabId(String);

impl LabId {
    pub fn new(id: &str) -> Result<Self, Error> {
        let ok = (1..=LAB_ID_MAX).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok {
            Ok(LabId(id.to_owned()))
        } else {
            Err(Error::InvalidLabId(id.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `ul-<lab>-`: every namespace of this lab starts with it.
    pub fn netns_prefix(&self) -> String {
        format!("{LAB_NETNS_PREFIX}-{}-", self.0)
    }

    /// `<lab>-`: every link the lab creates in the fabric starts with it.
    pub fn link_prefix(&self) -> String {
        format!("{}-", self.0)
    }

    pub fn fabric_netns(&self) -> String {
        format!("{}fab", self.netns_prefix())
    }

    pub fn internet_netns(&self) -> String {
        format!("{}inet", self.netns_prefix())
    }

    pub fn instance_netns(&self, instance: &InstanceId) -> String {
        format!("{}{}", self.netns_prefix(), instance.as_str())
    }

    pub fn igw_link(&self) -> String {
        format!("{}igw", self.link_prefix())
    }

    /// The bridge of a subnet.
    pub fn subnet_bridge(&self, subnet: &SubnetId) -> String {
        self.short(b's', subnet.as_str())
    }

    /// The fabric end of an ENI's veth.
    pub fn eni_port(&self, eni: &EniId) -> String {
        self.short(b'e', eni.as_str())
    }

    /// `<lab>-<kind><as many trailing characters of the id as fit>`.
    fn short(&self, kind: u8, id: &str) -> String {
        let head = format!("{}{}", self.link_prefix(), kind as char);
        let room = IFNAME_MAX - head.len();
        let tail = id.rsplit('-').next().unwrap_or(id);
        let tail = &tail[tail.len().saturating_sub(room)..];
        format!("{head}{tail}")
    }
}

/// The interface of an ENI inside its instance: `eth<device index>`, as on EC2's Linux images.
pub fn instance_ifname(device_index: u32) -> String {
    format!("eth{device_index}")
}

/// The fabric routing table mirroring a VPC route table: the base plus the last 7 hex digits of the id.
pub fn vpc_table(table: &RouteTableId) -> u32 {
    let tail = table.as_str().rsplit('-').next().unwrap_or("");
    let tail = &tail[tail.len().saturating_sub(7)..];
    LAB_TABLE_VPC_BASE + u32::from_str_radix(tail, 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_ids_are_short_and_plain() {
        assert!(LabId::new("a1").is_ok());
        assert!(LabId::new("abcdef").is_ok());
        for bad in ["", "abcdefg", "A1", "a-b", "a b"] {
            assert!(LabId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn link_names_fit_ifnamsiz_and_carry_the_lab() {
        for lab in ["a", "abcdef"] {
            let lab = LabId::new(lab).unwrap();
            let eni = lab.eni_port(&EniId::from("eni-0123456789abcdef0"));
            let br = lab.subnet_bridge(&SubnetId::from("subnet-0123456789abcdef0"));
            for n in [&eni, &br, &lab.igw_link()] {
                assert!(n.len() <= IFNAME_MAX, "{n}");
                assert!(n.starts_with(&lab.link_prefix()), "{n}");
            }
            assert!(eni.ends_with("bcdef0"));
            assert_ne!(eni, br);
        }
        let lab = LabId::new("t1").unwrap();
        assert_eq!(
            lab.eni_port(&EniId::from("eni-0123456789abcdef0")),
            "t1-e6789abcdef0"
        );
        assert_eq!(lab.fabric_netns(), "ul-t1-fab");
        assert_eq!(
            lab.instance_netns(&InstanceId::from("i-0abc")),
            "ul-t1-i-0abc"
        );
    }

    #[test]
    fn vpc_tables_stay_clear_of_the_kernel_and_owned_tables() {
        let t = vpc_table(&RouteTableId::from("rtb-0123456789abcdef0"));
        assert_eq!(t, LAB_TABLE_VPC_BASE + 0xabc_def0);
        assert!(t > underlay_core::names::LAB_TABLE_OWNED);
    }
}
