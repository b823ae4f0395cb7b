# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
CARGO ?= cargo
UNDERLAY := target/release/underlay

.PHONY: setup build image test-image demo test fuzz lint fmt clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --bins

# The container image: underlay, underlay-cni and what the agent executes, from this machine's Debian packages and
# a size-tuned release build (profile `image`), imported from scratch (nothing pulled). Writes
# target/oci/underlay-<version>.oci.tar and the split debug info in target/oci/debug (docs/install.md).
image: setup
	CARGO="$(CARGO)" bash scripts/build-image.sh

# The image `make test` runs (crates/cli/tests/image_root.rs): the same script, files and layout, from the dev
# build `make test` compiles anyway (a release build of the AWS SDK alone is ~25 CPU-minutes here); written to
# target/oci-dev, so `make test` never overwrites the shipping image. The size bar is checked on `make image`'s
# (UNDERLAY_TEST_IMAGE_DIR=target/oci cargo test -p underlay-cli --all-features --test image_root).
test-image: setup
	CARGO="$(CARGO)" UNDERLAY_IMAGE_PROFILE=dev bash scripts/build-image.sh

# The routed-mode planner at scale (5,000 nodes, 50-route tables), then `underlay lab demo`: a 12-node cluster in
# 3 zones on a VPC made of network namespaces, with the real controller, agents and CNI plugin; it checks every
# pod pair, kills a forwarder, and exits non-zero if anything fails; then the same cluster in eni mode (pods on
# ENI secondary IPs, source/dest check on for every ENI); then NetworkPolicy on the Kubernetes e2e model in both
# modes (`underlay lab policy`: every pod pair, port and protocol after each case). It needs root (network namespaces).
demo: build
	$(UNDERLAY) plan --nodes 20000 --zones 3 --subnets-per-zone 2 --route-limit 500 --summary
	$(UNDERLAY) lab down --name demo
	$(UNDERLAY) lab demo
	$(UNDERLAY) lab down --name demo
	$(UNDERLAY) lab demo --mode eni
	$(UNDERLAY) lab down --name pol
	$(UNDERLAY) lab policy --mode both

# Every check and every test: formatting, clippy with warnings as errors, and the tests, including the root tests
# in network namespaces (feature `root-tests`), the containerd CRI test, and the image test, which runs the image
# `make test-image` built (UNDERLAY_TEST_IMAGE_DIR=target/oci runs it against `make image`'s instead).
test: setup test-image
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) test --workspace --all-features --no-fail-fast

# Long fuzzing runs: every target of crates/fuzz for FUZZ_SECONDS each (default 60), coverage-guided with
# libFuzzer when nightly and cargo-fuzz are installed, else the stable generator for as long (docs/fuzzing.md).
# `make test` already runs every target over its corpus and a bounded set of generated inputs.
fuzz:
	@bash scripts/fuzz.sh

# The static checks alone (both also run in `make test`).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
