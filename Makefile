# The two commands a newcomer needs; see README.md.

.PHONY: test build

# Every test in the workspace: unit tests, services against real stores,
# outages with private store processes.
test:
	cargo test --workspace --all-features --locked

build:
	cargo build --workspace --release --locked
