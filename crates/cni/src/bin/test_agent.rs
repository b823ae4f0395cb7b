//! Test-only: the IPAM agent as a separate process, so root tests can kill -9 it. Built only with the
//! `root-tests` feature; never installed. Usage: `underlay-cni-test-agent <config.yaml>`.

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: underlay-cni-test-agent CONFIG"))?;
    let config = underlay_agent::AgentConfig::load(std::path::Path::new(&path))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(underlay_agent::run(
        config,
        underlay_agent::Fault::None,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    ))?;
    Ok(())
}
