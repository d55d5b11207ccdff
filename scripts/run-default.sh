#!/usr/bin/env bash
# Set up and run `outpost run` on the embedded default: simulated 6-axis
# sensors, the bundled BasicMotions model, no broker and no config file.
# Aggregates are logged every 10 s; Ctrl-C drains and exits 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec cargo run --release --locked -p outpost-runtime --bin outpost -- run "$@"
