//! `underlay names`: the kernel and API names underlay owns, for people writing alerts or cleaning up by hand.

use underlay_core::names;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn exec(_args: Args) -> anyhow::Result<()> {
    let rows = [
        ("api group", names::API_GROUP),
        ("api version", names::API_VERSION),
        ("finalizer", names::FINALIZER_CLEANUP),
        ("field manager (ctl)", names::FIELD_MANAGER_CONTROLLER),
        ("field manager (agent)", names::FIELD_MANAGER_AGENT),
        ("label (node)", names::LABEL_NODE),
        ("label (mode)", names::LABEL_MODE),
        ("leader lease", names::LEADER_LEASE),
        ("taint (until ready)", names::TAINT_NOT_READY),
        ("taint (pool empty)", names::TAINT_NO_FREE_IPS),
        ("ENI tag (cluster)", names::TAG_CLUSTER),
        ("ENI tag (node)", names::TAG_NODE),
        (
            "nft table",
            &format!("{} {}", names::NFT_FAMILY, names::NFT_TABLE),
        ),
        ("agent socket", names::AGENT_SOCKET),
        ("CNI conflist", names::CNI_CONFLIST),
        ("CNI plugin", names::CNI_PLUGIN),
    ];
    for (what, name) in rows {
        println!("{what:<22} {name}");
    }
    Ok(())
}
