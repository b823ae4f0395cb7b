//! With feature `transport-bench`, generates the gRPC (tonic) service for proto/ipam.proto, reusing the
//! message types of `underlay-ipam-api`. Without it, nothing to do.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "transport-bench")]
    {
        let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
        let schema = proto_dir.join("ipam.proto");
        println!("cargo:rerun-if-changed={}", schema.display());
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .extern_path(".underlay.ipam.v1", "::underlay_ipam_api::pb")
            .compile_protos(&[&schema], &[&proto_dir])?;
    }
    Ok(())
}
