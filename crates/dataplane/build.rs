//! Compiles the tc-BPF fast path (`bpf/*.bpf.c`) with the system clang when the `fastpath` feature is on.
//! Nothing else is needed: no nightly Rust, no bpf-linker, no downloaded toolchain (scripts/setup.sh installs
//! clang and the libbpf headers). `CLANG` overrides the compiler.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    if std::env::var_os("CARGO_FEATURE_FASTPATH").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => panic!("the fast path's build knows no include directory for {other}"),
    };
    let src = "bpf/fastpath.bpf.c";
    let obj = out.join("fastpath.bpf.o");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {clang} for {src}: {e} (scripts/setup.sh installs clang and libbpf-dev)"
            )
        });
    assert!(status.success(), "{clang} failed on {src}");
}
