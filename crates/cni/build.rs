//! Links the `underlay-cni` binary statically (a static PIE), so the plugin runs on any node OS whatever its
//! glibc: the container runtime executes it on the host, outside the image it was shipped in.
//!
//! `-C target-feature=+crt-static` is what a static link normally takes, but cargo cannot scope a rustc flag to
//! one binary of a workspace (a `RUSTFLAGS` or cargo-config setting would make every binary and test static and
//! rebuild the whole dependency tree). So this script does, for this one binary, what that flag does at link
//! time: `-static-pie` to the linker driver, and the C runtime and libgcc's unwinder as archives. The standard
//! library asks for `-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc` in dynamic mode; a search directory that comes
//! before the system's holds `.a` linker scripts under those names pointing at the static archives
//! (`libgcc_s` becomes `libgcc_eh` + `libgcc`, the unwinder `crt-static` itself would use), so the linker finds
//! archives first and the output has no `PT_INTERP` and no `DT_NEEDED`. The test
//! `crates/cni/tests/static_binary.rs` inspects the built binary.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" || target_env != "gnu" {
        // musl links statically by default; other targets are not node targets.
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = out.join("static-libs");
    fs::create_dir_all(&dir).expect("create the static-libs directory");

    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let archive = |name: &str| -> String {
        let found = Command::new(&cc)
            .arg(format!("-print-file-name={name}"))
            .output()
            .unwrap_or_else(|e| panic!("running `{cc} -print-file-name={name}`: {e}"));
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        // The driver echoes the bare name back when it finds no such file.
        let path = Path::new(&path);
        if !path.is_absolute() || !path.exists() {
            panic!(
                "{name} not found by `{cc}`: the static underlay-cni needs glibc's static archives \
                 (Debian package libc6-dev) and gcc's libgcc_eh.a"
            );
        }
        fs::canonicalize(path)
            .expect("canonicalize an archive path")
            .display()
            .to_string()
    };
    let (libc, gcc, gcc_eh) = (
        archive("libc.a"),
        archive("libgcc.a"),
        archive("libgcc_eh.a"),
    );

    let write = |name: &str, script: String| {
        fs::write(dir.join(name), script).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    };
    // libc and libgcc refer to each other: one group resolves both ways.
    write("libc.a", format!("GROUP ( {libc} {gcc_eh} {gcc} )\n"));
    write("libgcc_s.a", format!("GROUP ( {gcc_eh} {gcc} )\n"));
    for lib in ["util", "rt", "pthread", "m", "dl"] {
        let path = archive(&format!("lib{lib}.a"));
        write(&format!("lib{lib}.a"), format!("INPUT ( {path} )\n"));
    }

    println!("cargo:rustc-link-arg-bin=underlay-cni=-static-pie");
    // The linker applies every -L to every -l whatever their order, and user directories come before the
    // system's: the archives above win over the shared libraries of the same names.
    println!("cargo:rustc-link-arg-bin=underlay-cni=-L{}", dir.display());
}
