//! `underlay crd`: the UnderlayNode CustomResourceDefinition as YAML, generated from the Rust types.
//! `deploy/crds/underlaynode.yaml` is this command's output; a test fails when the two drift.

use kube::CustomResourceExt;
use underlay_api::UnderlayNode;

#[derive(Debug, clap::Args)]
pub struct Args {}

/// The CRD document exactly as `underlay crd` prints it.
pub fn render() -> anyhow::Result<String> {
    Ok(serde_yaml::to_string(&UnderlayNode::crd())?)
}

pub fn exec(_args: Args) -> anyhow::Result<()> {
    print!("{}", render()?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Path of the checked-in CRD, relative to the workspace root.
    const CHECKED_IN: &str = "deploy/crds/underlaynode.yaml";

    fn workspace_root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn checked_in_crd_matches_the_types() {
        let path = workspace_root().join(CHECKED_IN);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e}; run `underlay crd > {CHECKED_IN}`", path.display())
        });
        assert!(
            on_disk == render().unwrap(),
            "{CHECKED_IN} differs from the UnderlayNode types: run `underlay crd > {CHECKED_IN}` and commit it"
        );
    }

    #[test]
    fn checked_in_crd_passes_kubernetes_validate() {
        let root = workspace_root();
        let tool = root.join(".venv/bin/kubernetes-validate");
        assert!(
            tool.exists(),
            "{} not found: run scripts/setup.sh (it builds the .venv with kubernetes-validate)",
            tool.display()
        );
        let out = std::process::Command::new(&tool)
            .args(["--strict", "--kubernetes-version", "1.33"])
            .arg(root.join(CHECKED_IN))
            .output()
            .expect("run kubernetes-validate");
        assert!(
            out.status.success(),
            "kubernetes-validate rejected {CHECKED_IN}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
