# The two commands a newcomer needs; see README.md.

.PHONY: up test build deps proto-baseline

# Installs what is missing, builds, and starts the whole mesh with demo data
# (Ctrl-C stops everything).
up: deps
	cargo build --workspace --release --locked
	./target/release/chirp up

# Every test in the workspace: unit tests, services against real stores,
# outages with private store processes, the whole mesh through `chirp up`.
test:
	cargo test --workspace --all-features --locked
	# comment-service's suite again, on a six-node Redis Cluster.
	CHIRP_TEST_REDIS=cluster cargo test -p comment-service --all-features --locked

build:
	cargo build --workspace --release --locked

deps:
	bash scripts/install-deps

# Records the current contracts as the released baseline that CI's
# `buf breaking` compares against. Run it on purpose, when releasing.
proto-baseline:
	cd proto && buf build -o baseline.binpb
