//! `underlay-cni`: reads the environment and stdin, runs one CNI command, writes the reply on stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = underlay_cni::CniError::new(underlay_cni::spec::code::IO, "cannot read stdin")
            .with_details(e);
        return reply(
            &err.to_json(underlay_cni::spec::LATEST_VERSION),
            ExitCode::FAILURE,
        );
    }
    let env = |k: &str| std::env::var(k).ok();
    match underlay_cni::run(&env, &stdin) {
        Ok(Some(out)) => reply(&out, ExitCode::SUCCESS),
        Ok(None) => ExitCode::SUCCESS,
        Err((e, version)) => reply(&e.to_json(&version), ExitCode::FAILURE),
    }
}

fn reply(v: &serde_json::Value, code: ExitCode) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
    code
}
