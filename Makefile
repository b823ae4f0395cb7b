# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
CARGO ?= cargo
UNDERLAY := target/release/underlay

.PHONY: setup build demo test lint fmt clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --bins

# Until the lab exists, the demo is the routed-mode planner on a 5,000-node, 3-zone cluster at the default
# 50-route VPC limit, then the same cluster with one forwarder failed, a 40-node cluster (one route per node) and
# the documented example topology.
demo: build
	$(UNDERLAY) plan --nodes 5000 --zones 3 --subnets-per-zone 2 --route-limit 50
	$(UNDERLAY) plan --nodes 5000 --zones 3 --subnets-per-zone 2 --route-limit 50 --fail node-0001 --summary
	$(UNDERLAY) plan --nodes 40 --zones 3 --subnets-per-zone 2 --route-limit 50 --summary
	$(UNDERLAY) plan --topology examples/topology.yaml

# Every test, including the root tests in network namespaces (feature `root-tests`).
test: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) test --workspace --all-features --no-fail-fast

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
