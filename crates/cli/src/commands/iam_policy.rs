//! `underlay iam-policy`: the controller's IAM policy, built from the EC2 calls the controller issues in a mode
//! ([`Operation::for_mode`]), never kept by hand. `deploy/iam/controller-<mode>.json` is this command's output
//! with the defaults; a test fails when they drift.
//!
//! ```text
//!   Operation::for_mode(mode) ──► grants(op): which statement(s) allow it ──► one statement per grant, in order
//!   describes            "*" (EC2 cannot scope Describe* to resources, nor condition them on the VPC)
//!   routes               route-table/* in the cluster's VPC (ec2:Vpc)
//!   source/dest check    network-interface/* in the VPC (the node's primary ENI carries no underlay tag)
//!   eni mode             create only in the VPC with the cluster tag in the request, tag only at creation,
//!                        attach/detach/delete only ENIs tagged with the cluster (and in the VPC),
//!                        assign/unassign on ENIs of the VPC; the instance side of attach is unscoped
//! ```

use serde_json::{Value, json};
use underlay_cloud::{ControllerMode, Operation};
use underlay_core::names;

/// Placeholder for the cluster tag's value when `--cluster-name` is not given (the checked-in eni policy).
pub const CLUSTER_PLACEHOLDER: &str = "CLUSTER_NAME";
/// Placeholder for the VPC id when `--vpc` is not given (the checked-in policies).
pub const VPC_PLACEHOLDER: &str = "VPC_ID";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Routed,
    Eni,
}

impl From<Mode> for ControllerMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Routed => ControllerMode::Routed,
            Mode::Eni => ControllerMode::Eni,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The controller's address mode.
    #[arg(long, value_enum, default_value = "routed")]
    mode: Mode,
    /// eni mode: the cluster's name, the value of the `underlay.dev/cluster` tag the ENI statements require.
    #[arg(long, default_value = CLUSTER_PLACEHOLDER)]
    cluster_name: String,
    /// The cluster's VPC id: every statement EC2 lets be conditioned on `ec2:Vpc` is limited to it.
    #[arg(long, default_value = VPC_PLACEHOLDER)]
    vpc: String,
    /// ARN partition (`aws`, `aws-cn`, `aws-us-gov`).
    #[arg(long, default_value = "aws")]
    partition: String,
}

/// One statement of the policy; an operation is allowed by one or more of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Grant {
    /// Describe* on `*`.
    Describe,
    /// Route changes in any route table (the controller only touches routes inside the pod CIDR of the tables it
    /// was told to manage; IAM cannot see a route's destination).
    RouteTables,
    /// Attribute changes on any ENI: source/dest check on nodes' primary ENIs, which underlay does not tag.
    NetworkInterfaceAttributes,
    /// CreateNetworkInterface: the new ENI, only with the cluster tag in the request.
    CreateTaggedEnis,
    /// CreateNetworkInterface: the subnet and security groups it is created in.
    CreateEnisInSubnets,
    /// CreateTags as part of CreateNetworkInterface (tag-on-create), with the cluster tag.
    TagEnisOnCreate,
    /// Calls on ENIs already tagged with the cluster.
    OwnedEnis,
    /// Address and prefix assignment on any ENI: pods also use secondaries of the node's primary ENI, which
    /// belongs to the node and carries no underlay tag, so the statement cannot be conditioned on one.
    NodeEniAddresses,
    /// The instance side of attach and detach.
    Instances,
}

impl Grant {
    const ORDER: [Grant; 9] = [
        Grant::Describe,
        Grant::RouteTables,
        Grant::NetworkInterfaceAttributes,
        Grant::CreateTaggedEnis,
        Grant::CreateEnisInSubnets,
        Grant::TagEnisOnCreate,
        Grant::OwnedEnis,
        Grant::NodeEniAddresses,
        Grant::Instances,
    ];

    fn sid(self) -> &'static str {
        match self {
            Grant::Describe => "Describe",
            Grant::RouteTables => "RouteTables",
            Grant::NetworkInterfaceAttributes => "NetworkInterfaceAttributes",
            Grant::CreateTaggedEnis => "CreateTaggedEnis",
            Grant::CreateEnisInSubnets => "CreateEnisInSubnets",
            Grant::TagEnisOnCreate => "TagEnisOnCreate",
            Grant::OwnedEnis => "OwnedEnis",
            Grant::NodeEniAddresses => "NodeEniAddresses",
            Grant::Instances => "AttachToInstances",
        }
    }
}

/// The statements that allow `op`. Exhaustive: a new operation does not compile until it is placed here.
fn grants(op: Operation) -> &'static [Grant] {
    match op {
        Operation::DescribeVpcs
        | Operation::DescribeSubnets
        | Operation::DescribeRouteTables
        | Operation::DescribeInstances
        | Operation::DescribeInstanceTypes
        | Operation::DescribeNetworkInterfaces => &[Grant::Describe],
        Operation::CreateRoute | Operation::ReplaceRoute | Operation::DeleteRoute => {
            &[Grant::RouteTables]
        }
        Operation::ModifyNetworkInterfaceAttribute => &[Grant::NetworkInterfaceAttributes],
        Operation::CreateNetworkInterface => &[Grant::CreateTaggedEnis, Grant::CreateEnisInSubnets],
        Operation::AttachNetworkInterface | Operation::DetachNetworkInterface => {
            &[Grant::OwnedEnis, Grant::Instances]
        }
        Operation::DeleteNetworkInterface => &[Grant::OwnedEnis],
        Operation::AssignPrivateIpAddresses | Operation::UnassignPrivateIpAddresses => {
            &[Grant::NodeEniAddresses]
        }
        // Only ever as tag-on-create: retagging an owned ENI could move it out of the cluster's reach.
        Operation::CreateTags => &[Grant::TagEnisOnCreate],
    }
}

/// Whether EC2 evaluates `ec2:Vpc` for every resource a grant names (AWS's Service Authorization Reference, EC2:
/// route-table, network-interface, subnet and security-group carry the key; instance does not; Describe* take no
/// resource). Tag-on-create is left to CreateNetworkInterface's own VPC condition.
fn vpc_scoped(grant: Grant) -> bool {
    match grant {
        Grant::RouteTables
        | Grant::NetworkInterfaceAttributes
        | Grant::CreateTaggedEnis
        | Grant::CreateEnisInSubnets
        | Grant::OwnedEnis
        | Grant::NodeEniAddresses => true,
        Grant::Describe | Grant::TagEnisOnCreate | Grant::Instances => false,
    }
}

/// The policy document for a controller in `mode`, in VPC `vpc`.
pub fn policy(mode: ControllerMode, cluster: &str, vpc: &str, partition: &str) -> Value {
    let arn = |kind: &str| format!("arn:{partition}:ec2:*:*:{kind}/*");
    let vpc_arn = format!("arn:{partition}:ec2:*:*:vpc/{vpc}");
    let ops = Operation::for_mode(mode);
    let statements: Vec<Value> = Grant::ORDER
        .into_iter()
        .filter_map(|grant| {
            let actions: Vec<String> = ops
                .iter()
                .filter(|op| grants(**op).contains(&grant))
                .map(|op| format!("ec2:{}", op.name()))
                .collect();
            if actions.is_empty() {
                return None;
            }
            let request_tag = format!("aws:RequestTag/{}", names::TAG_CLUSTER);
            let resource_tag = format!("aws:ResourceTag/{}", names::TAG_CLUSTER);
            let (resource, condition) = match grant {
                Grant::Describe => (json!("*"), None),
                Grant::RouteTables => (json!(arn("route-table")), None),
                Grant::NetworkInterfaceAttributes => (json!(arn("network-interface")), None),
                Grant::CreateTaggedEnis => (
                    json!(arn("network-interface")),
                    Some(json!({ "StringEquals": { request_tag: cluster } })),
                ),
                Grant::CreateEnisInSubnets => (json!([arn("subnet"), arn("security-group")]), None),
                Grant::TagEnisOnCreate => (
                    json!(arn("network-interface")),
                    Some(json!({ "StringEquals": {
                        "ec2:CreateAction": Operation::CreateNetworkInterface.name(),
                        request_tag: cluster,
                    } })),
                ),
                Grant::OwnedEnis => (
                    json!(arn("network-interface")),
                    Some(json!({ "StringEquals": { resource_tag: cluster } })),
                ),
                Grant::NodeEniAddresses => (json!(arn("network-interface")), None),
                Grant::Instances => (json!(arn("instance")), None),
            };
            let mut condition = condition.unwrap_or_else(|| json!({}));
            if vpc_scoped(grant) {
                condition["ArnEquals"] = json!({ "ec2:Vpc": vpc_arn });
            }
            let mut s = json!({
                "Sid": grant.sid(),
                "Effect": "Allow",
                "Action": actions,
                "Resource": resource,
            });
            if condition.as_object().is_some_and(|c| !c.is_empty()) {
                s["Condition"] = condition;
            }
            Some(s)
        })
        .collect();
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// The document exactly as `underlay iam-policy` prints it (pretty JSON, trailing newline).
pub fn render(
    mode: ControllerMode,
    cluster: &str,
    vpc: &str,
    partition: &str,
) -> anyhow::Result<String> {
    let mut s = serde_json::to_string_pretty(&policy(mode, cluster, vpc, partition))?;
    s.push('\n');
    Ok(s)
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.cluster_name.is_empty(),
        "--cluster-name must not be empty"
    );
    anyhow::ensure!(
        !args.vpc.is_empty() && !args.vpc.contains(['/', '*', '"']),
        "--vpc must be a VPC id (vpc-…)"
    );
    print!(
        "{}",
        render(
            args.mode.into(),
            &args.cluster_name,
            &args.vpc,
            &args.partition
        )?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    fn workspace_root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn actions(doc: &Value) -> BTreeSet<String> {
        doc["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["Action"].as_array().unwrap().clone())
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    fn statement<'a>(doc: &'a Value, sid: &str) -> &'a Value {
        doc["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Sid"] == sid)
            .unwrap_or_else(|| panic!("no statement {sid}"))
    }

    #[test]
    fn every_action_of_the_mode_and_nothing_else() {
        for mode in ControllerMode::ALL {
            let doc = policy(mode, "c1", "vpc-1", "aws");
            let want: BTreeSet<String> = Operation::for_mode(mode)
                .into_iter()
                .map(|op| format!("ec2:{}", op.name()))
                .collect();
            assert_eq!(actions(&doc), want, "{}", mode.name());
        }
    }

    #[test]
    fn routed_policy_has_no_eni_lifecycle_and_every_change_is_limited_to_the_vpc() {
        let doc = policy(ControllerMode::Routed, "c1", "vpc-1", "aws");
        let all = actions(&doc);
        for a in [
            "ec2:CreateNetworkInterface",
            "ec2:CreateTags",
            "ec2:DeleteNetworkInterface",
        ] {
            assert!(!all.contains(a), "{a} in the routed policy");
        }
        for s in doc["Statement"].as_array().unwrap() {
            if s["Sid"] == "Describe" {
                assert!(s.get("Condition").is_none());
            } else {
                assert_eq!(
                    s["Condition"],
                    json!({ "ArnEquals": { "ec2:Vpc": "arn:aws:ec2:*:*:vpc/vpc-1" } }),
                    "{s}"
                );
            }
        }
        assert_eq!(statement(&doc, "Describe")["Resource"], "*");
    }

    #[test]
    fn eni_mutations_are_conditioned_on_the_cluster_tag() {
        let doc = policy(ControllerMode::Eni, "prod", "vpc-9", "aws-cn");
        let vpc = json!({ "ec2:Vpc": "arn:aws-cn:ec2:*:*:vpc/vpc-9" });
        for sid in [
            "NetworkInterfaceAttributes",
            "CreateTaggedEnis",
            "CreateEnisInSubnets",
            "OwnedEnis",
            "NodeEniAddresses",
        ] {
            assert_eq!(statement(&doc, sid)["Condition"]["ArnEquals"], vpc, "{sid}");
        }
        // EC2 has no ec2:Vpc on instances; tag-on-create rides on CreateNetworkInterface's VPC condition.
        for sid in ["AttachToInstances", "TagEnisOnCreate", "Describe"] {
            assert!(
                statement(&doc, sid)
                    .get("Condition")
                    .and_then(|c| c.get("ArnEquals"))
                    .is_none(),
                "{sid}"
            );
        }
        let owned = statement(&doc, "OwnedEnis");
        assert_eq!(
            owned["Condition"]["StringEquals"]["aws:ResourceTag/underlay.dev/cluster"],
            "prod"
        );
        assert_eq!(owned["Resource"], "arn:aws-cn:ec2:*:*:network-interface/*");
        assert_eq!(
            owned["Action"],
            json!([
                "ec2:AttachNetworkInterface",
                "ec2:DetachNetworkInterface",
                "ec2:DeleteNetworkInterface"
            ])
        );
        // Addresses: also on the node's untagged primary ENI, so no tag condition (the VPC only); and only these
        // two actions.
        let addresses = statement(&doc, "NodeEniAddresses");
        assert!(addresses["Condition"].get("StringEquals").is_none());
        assert_eq!(
            addresses["Action"],
            json!([
                "ec2:AssignPrivateIpAddresses",
                "ec2:UnassignPrivateIpAddresses"
            ])
        );
        // Never called: no route changes, no retagging of an existing ENI.
        let all: Vec<&Value> = doc["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["Action"].as_array().unwrap())
            .collect();
        for a in ["ec2:CreateRoute", "ec2:ReplaceRoute", "ec2:DeleteRoute"] {
            assert!(!all.iter().any(|x| *x == a), "{a} in the eni policy");
        }
        let create = statement(&doc, "CreateTaggedEnis");
        assert_eq!(
            create["Condition"]["StringEquals"]["aws:RequestTag/underlay.dev/cluster"],
            "prod"
        );
        let tag = statement(&doc, "TagEnisOnCreate");
        assert_eq!(
            tag["Condition"]["StringEquals"]["ec2:CreateAction"],
            "CreateNetworkInterface"
        );
        assert_eq!(tag["Action"], json!(["ec2:CreateTags"]));
    }

    #[test]
    fn checked_in_policies_match_the_command() {
        for mode in ControllerMode::ALL {
            let rel = format!("deploy/iam/controller-{}.json", mode.name());
            let path = workspace_root().join(&rel);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run `underlay iam-policy --mode {} > {rel}`",
                    path.display(),
                    mode.name()
                )
            });
            assert!(
                on_disk == render(mode, CLUSTER_PLACEHOLDER, VPC_PLACEHOLDER, "aws").unwrap(),
                "{rel} differs from `underlay iam-policy --mode {m}`: run `underlay iam-policy --mode {m} > {rel}` \
                 and commit it",
                m = mode.name()
            );
        }
    }
}
