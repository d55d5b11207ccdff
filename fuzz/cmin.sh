#!/usr/bin/env bash
# Minimize each target's corpus (or those named) in place, keeping every
# input that adds coverage: what `cargo fuzz cmin` does, run on the binaries
# fuzz/run.sh built (no rebuild). See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bin=target/x86_64-unknown-linux-gnu/release
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(ls fuzz_targets | sed 's/\.rs$//')
fi
for t in "${targets[@]}"; do
    before=$(ls "corpus/$t" | wc -l)
    rm -rf "corpus/$t.min"
    mkdir -p "corpus/$t.min"
    nice -n 10 "$bin/$t" -set_cover_merge=1 -rss_limit_mb=4096 -timeout=20 "corpus/$t.min" "corpus/$t" \
        >"target/logs/$t.cmin.log" 2>&1
    rm -rf "corpus/$t"
    mv "corpus/$t.min" "corpus/$t"
    echo "$t: $before -> $(ls "corpus/$t" | wc -l) inputs, $(du -sk "corpus/$t" | cut -f1) KiB"
done
