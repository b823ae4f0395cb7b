//! `underlay version`: the build, as text or JSON (what `--version` prints, and the platform).

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let os = std::env::consts::OS;
    let arch = std::env::consts::ARCH;
    match args.format {
        Format::Table => {
            println!("underlay {version}");
            println!("platform {os}/{arch}");
        }
        Format::Json => println!(
            "{}",
            serde_json::json!({ "version": version, "os": os, "arch": arch })
        ),
    }
    Ok(())
}
