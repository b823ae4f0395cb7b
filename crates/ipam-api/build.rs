//! Generates the message types from the checked-in schema (protoc comes from scripts/setup.sh).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let schema = proto_dir.join("ipam.proto");
    println!("cargo:rerun-if-changed={}", schema.display());
    prost_build::Config::new().compile_protos(&[&schema], &[&proto_dir])?;
    Ok(())
}
