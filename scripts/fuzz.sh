#!/usr/bin/env bash
# `make fuzz`: every fuzz target (crates/fuzz) for FUZZ_SECONDS seconds each (default 60).
#   FUZZ_TARGETS="ipam_frames checkpoint"   only these targets
#   FUZZ_JOBS=2                             libFuzzer workers per target
# With nightly Rust and cargo-fuzz: libFuzzer, coverage-guided, over fuzz/corpus/<target> (read) and
# fuzz/work/<target> (new inputs it finds; not checked in). A crash lands in fuzz/artifacts/<target>/.
# Without them: the stable generated run (raw bytes, mutated corpus seeds, structured documents) for as long,
# not coverage-guided, and this says so. docs/fuzzing.md has the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^underlay-fuzz-libfuzzer$')}
jobs=${FUZZ_JOBS:-1}

if cargo +nightly --version >/dev/null 2>&1 && cargo +nightly fuzz --version >/dev/null 2>&1; then
    parallel=()
    if [ "$jobs" -gt 1 ]; then parallel=(-jobs="$jobs" -workers="$jobs"); fi
    failed=()
    for t in $targets; do
        mkdir -p "fuzz/work/$t"
        echo "== $t: libFuzzer for ${seconds}s"
        cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none -O "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
            -max_total_time="$seconds" -dict=fuzz/underlay.dict -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
            "${parallel[@]}" -print_final_stats=1 || failed+=("$t")
    done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "make fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/<target>/; docs/fuzzing.md)" >&2
        exit 1
    fi
else
    echo "make fuzz: nightly Rust or cargo-fuzz is missing (rustup toolchain install nightly;" \
        "cargo +nightly install cargo-fuzz): running the stable generated inputs for ${seconds}s per target" \
        "instead. This is NOT coverage-guided." >&2
    for t in $targets; do
        UNDERLAY_FUZZ_TARGET="$t" UNDERLAY_FUZZ_SECONDS="$seconds" \
            cargo test --release -p underlay-fuzz --test fuzz generated_inputs_never_panic -- --nocapture
    done
fi
