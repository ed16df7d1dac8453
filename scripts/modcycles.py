#!/usr/bin/env python3
"""Fails if a crate's files import each other in a cycle.

    python3 scripts/modcycles.py crates/identity-binding-proxy/src crates/emulators/src src

For each source directory (a crate's src/), every `.rs` file is one node; a `crate::a::b::C`
path in a file (in a `use` line, a `use crate::{..}` group, or in code) is an edge to the file
of the longest module prefix `a::b` or `a` that exists. Test modules (`#[cfg(test)] mod ..`),
comments and string literals are left out: tests may reach anywhere. Prints each cycle found,
one line per cycle with its files in import order, and exits 1 if there is any; else prints
the number of files and edges and exits 0.
"""
import os
import re
import sys

COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
STRING = re.compile(r'"(?:\\.|[^"\\])*"')
TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{")
PATH = re.compile(r"\bcrate((?:::[A-Za-z_]\w*)+)")
GROUP = re.compile(r"\bcrate::\{")


def module_files(src):
    """module path (tuple of names) -> file, for every .rs file under src."""
    found = {}
    for root, _, names in os.walk(src):
        for name in names:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            parts = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
            if parts[-1] == "mod":
                parts.pop()
            if parts in (["lib"], ["main"]):
                parts = []
            found[tuple(parts)] = path
    return found


def production_text(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = STRING.sub('""', COMMENT.sub("", text))
    test = TEST_MOD.search(text)
    return text[: test.start()] if test else text


def group_paths(text, start):
    """The paths of the `use crate::{...}` group whose `{` is at `start`, nested groups
    expanded: `crate::{a::{b, c}, d}` gives a::b, a::c, d."""
    depth, i = 0, start
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            break
        i += 1
    return expand("", text[start + 1 : i])


def expand(prefix, body):
    out, depth, item = [], 0, ""
    for ch in body + ",":
        if ch == "," and depth == 0:
            item = item.strip()
            if "{" in item:
                head, inner = item.split("{", 1)
                out += expand(prefix + head.strip(), inner.rsplit("}", 1)[0])
            elif item:
                out.append(prefix + item.split(" as ")[0].strip())
            item = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        item += ch
    return out


def imports(path, modules):
    text = production_text(path)
    paths = [m.group(1).lstrip(":") for m in PATH.finditer(text)]
    for m in GROUP.finditer(text):
        paths += group_paths(text, m.end() - 1)
    targets = set()
    for p in paths:
        names = [n for n in p.split("::") if n and n != "self"]
        for n in range(len(names), 0, -1):
            target = modules.get(tuple(names[:n]))
            if target:
                if target != path:
                    targets.add(target)
                break
    return targets


def cycles(graph):
    """One cycle per back edge met in a depth-first walk (iterative: no recursion limit)."""
    state, found = {}, []
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        state[root] = "open"
        trail = [root]
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                stack.pop()
                trail.pop()
                state[node] = "done"
            elif state.get(nxt) == "open":
                found.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                state[nxt] = "open"
                trail.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return found


def main(dirs):
    failed = False
    for src in dirs:
        modules = module_files(src)
        graph = {p: imports(p, modules) for p in modules.values()}
        found = cycles(graph)
        for c in found:
            print(f"{src}: import cycle: " + " -> ".join(os.path.relpath(p, src) for p in c))
        edges = sum(len(e) for e in graph.values())
        print(f"{src}: {len(graph)} files, {edges} imports, {len(found)} cycles")
        failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
