#!/usr/bin/env bash
# The release binary, stripped, within 5 MB (issue 12: the one static file users drop on a
# node). Builds the release binary (the README's run command builds the same), strips a copy,
# and fails above the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${ARSERVICE_SIZE_LIMIT:-5000000}
cargo build --release --bin arservice
binary=target/x86_64-unknown-linux-gnu/release/arservice
stripped=$(mktemp)
trap 'rm -f "$stripped"' EXIT
strip -o "$stripped" "$binary"
size=$(stat -c %s "$stripped")
echo "size: arservice stripped is $size bytes (limit $limit)"
if [ "$size" -gt "$limit" ]; then
    echo "size: above the limit of $limit bytes" >&2
    exit 1
fi
