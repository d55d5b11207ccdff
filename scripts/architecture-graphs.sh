#!/usr/bin/env bash
# Rewrites the module graphs in docs/ARCHITECTURE.md from the code
# (scripts/module-graph.py); tests/tests/architecture.rs checks they match.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 - <<'PY'
import re, subprocess
crates = ["runtime/src", "models/src", "models/train/src", "storage/src"]
blocks = []
for c in crates:
    out = subprocess.run(["python3", "scripts/module-graph.py", c, "--mermaid"],
                         capture_output=True, text=True).stdout
    blocks.append(f"### `{c}`\n\n```mermaid\n{out}```\n")
graphs = "\n".join(blocks)
doc = open("docs/ARCHITECTURE.md").read()
start = doc.index("<!-- graphs -->")
end = doc.index("<!-- /graphs -->")
doc = doc[:start] + "<!-- graphs -->\n" + graphs + doc[end:]
open("docs/ARCHITECTURE.md", "w").write(doc)
PY
