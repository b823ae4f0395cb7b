//! Network limits of common EC2 instance types, as published by AWS (`DescribeInstanceTypes` →
//! `NetworkInfo.MaximumNetworkInterfaces`, `Ipv4AddressesPerInterface`; Nitro = supports /28 prefix delegation).
//!
//! Pure data: vpcsim serves it from `DescribeInstanceTypes`, the controller uses it (and the real API) for
//! max-pods arithmetic. The numbers match amazon-vpc-cni's `eni-max-pods.txt`
//! (`max pods = ENIs × (IPv4 per ENI − 1) + 2`).

use serde::{Deserialize, Serialize};

/// Network limits of one instance type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstanceTypeLimits {
    pub name: &'static str,
    pub vcpus: u32,
    /// Maximum attached network interfaces (device indexes 0..max_enis).
    pub max_enis: u32,
    /// IPv4 addresses per interface, the primary included. A delegated /28 prefix takes one of these slots.
    pub ipv4_per_eni: u32,
    /// Built on Nitro: supports /28 prefix delegation.
    pub nitro: bool,
}

impl InstanceTypeLimits {
    /// Pods a node can host with one secondary address per pod: `ENIs × (IPs per ENI − 1) + 2`
    /// (the two host-network pods every node runs are not counted against addresses).
    pub fn max_pods_secondary_ips(&self) -> u32 {
        self.max_enis * (self.ipv4_per_eni - 1) + 2
    }

    /// Pods with /28 prefix delegation on every free slot: `ENIs × (IPs per ENI − 1) × 16 + 2`; `None` when
    /// the type is not Nitro. Kubernetes' own caps (110 / 250) are the caller's business.
    pub fn max_pods_prefixes(&self) -> Option<u32> {
        self.nitro
            .then(|| self.max_enis * (self.ipv4_per_eni - 1) * 16 + 2)
    }
}

const fn t(
    name: &'static str,
    vcpus: u32,
    max_enis: u32,
    ipv4_per_eni: u32,
    nitro: bool,
) -> InstanceTypeLimits {
    InstanceTypeLimits {
        name,
        vcpus,
        max_enis,
        ipv4_per_eni,
        nitro,
    }
}

/// The table, sorted by family then size.
pub const INSTANCE_TYPES: &[InstanceTypeLimits] = &[
    t("c4.large", 2, 3, 10, false),
    t("c4.xlarge", 4, 4, 15, false),
    t("c5.large", 2, 3, 10, true),
    t("c5.xlarge", 4, 4, 15, true),
    t("c5.2xlarge", 8, 4, 15, true),
    t("c5.4xlarge", 16, 8, 30, true),
    t("c5.9xlarge", 36, 8, 30, true),
    t("c5.18xlarge", 72, 15, 50, true),
    t("c6g.medium", 1, 2, 4, true),
    t("c6g.large", 2, 3, 10, true),
    t("c6g.xlarge", 4, 4, 15, true),
    t("c6g.4xlarge", 16, 8, 30, true),
    t("m4.large", 2, 2, 10, false),
    t("m4.xlarge", 4, 4, 15, false),
    t("m5.large", 2, 3, 10, true),
    t("m5.xlarge", 4, 4, 15, true),
    t("m5.2xlarge", 8, 4, 15, true),
    t("m5.4xlarge", 16, 8, 30, true),
    t("m5.8xlarge", 32, 8, 30, true),
    t("m5.12xlarge", 48, 8, 30, true),
    t("m5.16xlarge", 64, 15, 50, true),
    t("m5.24xlarge", 96, 15, 50, true),
    t("m6i.large", 2, 3, 10, true),
    t("m6i.xlarge", 4, 4, 15, true),
    t("m6i.2xlarge", 8, 4, 15, true),
    t("m6i.4xlarge", 16, 8, 30, true),
    t("r5.large", 2, 3, 10, true),
    t("r5.xlarge", 4, 4, 15, true),
    t("r5.2xlarge", 8, 4, 15, true),
    t("r5.4xlarge", 16, 8, 30, true),
    t("t2.micro", 1, 2, 2, false),
    t("t2.medium", 2, 3, 6, false),
    t("t2.large", 2, 3, 12, false),
    t("t3.micro", 2, 2, 2, true),
    t("t3.small", 2, 3, 4, true),
    t("t3.medium", 2, 3, 6, true),
    t("t3.large", 2, 3, 12, true),
    t("t3.xlarge", 4, 4, 15, true),
    t("t3.2xlarge", 8, 4, 15, true),
];

/// Limits of `name`, if the table knows it.
pub fn lookup(name: &str) -> Option<&'static InstanceTypeLimits> {
    INSTANCE_TYPES.iter().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pods_match_the_published_eni_max_pods_table() {
        // Values from amazon-vpc-cni-k8s misc/eni-max-pods.txt.
        let published = [
            ("t3.micro", 4),
            ("t3.small", 11),
            ("t3.medium", 17),
            ("t2.medium", 17),
            ("m4.large", 20),
            ("m5.large", 29),
            ("m5.xlarge", 58),
            ("m5.4xlarge", 234),
            ("c5.4xlarge", 234),
            ("m5.24xlarge", 737),
            ("c5.18xlarge", 737),
            ("c6g.medium", 8),
            ("r5.large", 29),
            ("m6i.large", 29),
        ];
        for (name, pods) in published {
            assert_eq!(
                lookup(name).unwrap().max_pods_secondary_ips(),
                pods,
                "{name}"
            );
        }
    }

    #[test]
    fn table_is_unique_and_large_enough() {
        let mut names: Vec<_> = INSTANCE_TYPES.iter().map(|t| t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), INSTANCE_TYPES.len());
        assert!(INSTANCE_TYPES.len() >= 25);
        assert!(
            INSTANCE_TYPES
                .iter()
                .all(|t| t.max_enis >= 2 && t.ipv4_per_eni >= 2)
        );
    }

    #[test]
    fn prefixes_only_on_nitro() {
        assert_eq!(lookup("t2.medium").unwrap().max_pods_prefixes(), None);
        assert_eq!(
            lookup("m5.large").unwrap().max_pods_prefixes(),
            Some(3 * 9 * 16 + 2)
        );
        assert!(lookup("x9.nothing").is_none());
    }
}
