//! The plugin binary runs on the host, whatever its glibc: it must be statically linked. Reads the ELF headers of
//! the binary cargo built: no program interpreter (`PT_INTERP`) and no `DT_NEEDED` entry in its dynamic section
//! (a static PIE keeps a dynamic section for its own relocations, but needs no shared library).

use std::path::Path;

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[derive(Debug, Default)]
struct Linkage {
    interp: Option<String>,
    needed: usize,
}

/// Program headers of a little-endian ELF64 file: the interpreter it names and its count of DT_NEEDED entries.
fn linkage(path: &Path) -> Linkage {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(&b[..4], b"\x7fELF", "{} is not an ELF file", path.display());
    assert_eq!(b[4], 2, "ELF64 expected");
    assert_eq!(b[5], 1, "little-endian ELF expected");
    let phoff = u64_at(&b, 0x20) as usize;
    let phentsize = u16_at(&b, 0x36) as usize;
    let phnum = u16_at(&b, 0x38) as usize;
    let mut out = Linkage::default();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = u32_at(&b, ph);
        let offset = u64_at(&b, ph + 0x08) as usize;
        let filesz = u64_at(&b, ph + 0x20) as usize;
        let seg = &b[offset..offset + filesz];
        match kind {
            PT_INTERP => {
                out.interp = Some(
                    String::from_utf8_lossy(seg)
                        .trim_end_matches('\0')
                        .to_string(),
                )
            }
            PT_DYNAMIC => {
                for entry in seg.chunks_exact(16) {
                    let tag = u64_at(entry, 0);
                    if tag == DT_NULL {
                        break;
                    }
                    if tag == DT_NEEDED {
                        out.needed += 1;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn underlay_cni_is_statically_linked() {
    let bin = Path::new(env!("CARGO_BIN_EXE_underlay-cni"));
    let l = linkage(bin);
    assert_eq!(
        l.interp,
        None,
        "{} names a program interpreter",
        bin.display()
    );
    assert_eq!(l.needed, 0, "{} needs shared libraries", bin.display());
}

/// The inspection itself tells a dynamic binary from a static one: this test binary is linked dynamically.
#[test]
fn the_inspection_sees_a_dynamic_binary() {
    let me = std::env::current_exe().unwrap();
    let l = linkage(&me);
    assert!(l.interp.is_some(), "{l:?}");
    assert!(l.needed > 0, "{l:?}");
}

/// What a user would check by hand: `ldd` (when present) calls it static too.
#[test]
fn ldd_agrees() {
    let bin = env!("CARGO_BIN_EXE_underlay-cni");
    let Ok(out) = std::process::Command::new("ldd").arg(bin).output() else {
        return; // no ldd on this machine: the ELF inspection above is the check
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("statically linked") || text.contains("not a dynamic executable"),
        "ldd {bin}: {text}"
    );
}

/// A static glibc binary still runs: the plugin answers VERSION.
#[test]
fn the_static_plugin_runs() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_underlay-cni"))
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"cniVersion":"1.0.0"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["supportedVersions"].as_array().unwrap().len() >= 3);
}
