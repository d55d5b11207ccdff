#!/usr/bin/env python3
"""The module graph of a crate, drawn from its source.

    scripts/module-graph.py runtime/src         # edges, cycles, exit 1 on a cycle
    scripts/module-graph.py runtime/src --dot   # Graphviz
    scripts/module-graph.py runtime/src --mermaid

A node is a top-level module of the crate (`ingest/mqtt.rs` belongs to
`ingest`); an edge A -> B means a file of A names `crate::B` (in a `use` or a
path). `main.rs` and `lib.rs` are the crate's roots and not nodes. Exit
status 1 when the graph has a cycle (every strongly connected component of
more than one module is printed).
"""
import os
import re
import sys

ROOTS = {"lib", "main"}
PATH = re.compile(r"\bcrate::(?:\{([^}]*)\}|([a-z_][a-z0-9_]*))")
USE_BLOCK = re.compile(r"\buse\s+crate::\{(.*?)\};", re.S)
COMMENT = re.compile(r"//[^\n]*")


def modules(src):
    mods = {}
    for entry in sorted(os.listdir(src)):
        p = os.path.join(src, entry)
        if entry.endswith(".rs"):
            name = entry[:-3]
            if name in ROOTS or name == "mod":
                continue
            mods.setdefault(name, []).append(p)
        elif os.path.isdir(p) and entry != "bin":
            for dirpath, _, files in os.walk(p):
                for f in files:
                    if f.endswith(".rs"):
                        mods.setdefault(entry, []).append(os.path.join(dirpath, f))
    return mods


def strip_tests(text):
    # `#[cfg(test)] mod tests { ... }` at the end of a file: test code may
    # use anything and is not part of the layering.
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+tests\s*\{", text)
    return text[: m.start()] if m else text


def edges(mods):
    out = {m: set() for m in mods}
    for mod, files in mods.items():
        for f in files:
            with open(f, encoding="utf-8") as fh:
                text = COMMENT.sub("", strip_tests(fh.read()))
            names = []
            for block in USE_BLOCK.findall(text):
                # top-level names of a grouped use: `crate::{a::X, b::{Y, Z}}`
                depth, cur = 0, ""
                for ch in block:
                    if ch == "{":
                        depth += 1
                    elif ch == "}":
                        depth -= 1
                    elif ch == "," and depth == 0:
                        names.append(cur.strip().split("::")[0])
                        cur = ""
                        continue
                    cur += ch
                names.append(cur.strip().split("::")[0])
            for grouped, single in PATH.findall(text):
                if single:
                    names.append(single)
            for n in names:
                if n in mods and n != mod:
                    out[mod].add(n)
    return out


def sccs(graph):
    index, low, stack, on, res, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            res.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return res


def layers(graph):
    """Longest path to a sink: layer 0 imports nothing of the crate."""
    memo = {}

    def depth(v, seen=()):
        if v in memo:
            return memo[v]
        if v in seen:
            return 0
        d = 1 + max((depth(w, seen + (v,)) for w in graph[v]), default=-1)
        memo[v] = d
        return d

    return {v: depth(v) for v in graph}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    graph = edges(modules(args[0]))
    cycles = [c for c in sccs(graph) if len(c) > 1]
    if "--dot" in sys.argv:
        print("digraph modules {\n  rankdir=BT;")
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f'  "{a}" -> "{b}";')
        print("}")
    elif "--mermaid" in sys.argv:
        print("graph BT")
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f"  {a} --> {b}")
    else:
        lv = layers(graph) if not cycles else {v: "?" for v in graph}
        for a in sorted(graph, key=lambda v: (lv[v] if isinstance(lv[v], int) else -1, v)):
            deps = ", ".join(sorted(graph[a])) or "-"
            print(f"[{lv[a]}] {a} -> {deps}")
    for c in cycles:
        print("cycle: " + " <-> ".join(c), file=sys.stderr)
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
