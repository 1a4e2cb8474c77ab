#!/usr/bin/env python3
"""Check that modules only import from lower layers.

Reads the layer table of docs/architecture.md (the rows between `<!-- layers:begin -->` and
`<!-- layers:end -->`: `| layer number | module, module | ... |`), lists every `crate::<module>`
edge between top-level modules of src/ (code only: comments and doc comments are skipped), and
fails on an edge that points to the same or a higher layer, or on a module the table does not
place. The binary's command-line front end (src/cli, src/main.rs) sits above every layer.

Usage: scripts/ci/check_layers.py [--list]   (--list prints every edge with its layers)
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"


def layer_table():
    text = DOC.read_text()
    m = re.search(r"<!-- layers:begin -->(.*?)<!-- layers:end -->", text, re.S)
    if not m:
        sys.exit(f"{DOC}: no layer table between <!-- layers:begin --> and <!-- layers:end -->")
    layers = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([a-z_]+)`", cells[1]):
            if name in layers:
                sys.exit(f"{DOC}: module `{name}` is placed twice")
            layers[name] = int(cells[0])
    return layers


def top_module(path):
    rel = path.relative_to(SRC).parts
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def code_lines(path):
    """Source lines with comments removed (line comments and /* */ blocks; strings are rare
    enough in `use` lines that they are not parsed)."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    for no, line in enumerate(text.splitlines(), 1):
        code = line.split("//", 1)[0]
        if code.strip():
            yield no, code


def edges():
    found = []
    for path in sorted(SRC.rglob("*.rs")):
        here = top_module(path)
        if here in ("main", "cli", "lib"):
            continue
        pending = ""  # a `use crate::{...}` spanning lines
        for no, code in code_lines(path):
            targets = re.findall(r"\bcrate::([a-z_]+)\b", code)
            group = pending + code if pending else code
            m = re.search(r"\bcrate::\{([^}]*)(\}?)", group)
            if m:
                targets += re.findall(r"(?:^|[,{\s])([a-z_]+)(?=::|\s*[,}]|\s*$)", m.group(1))
                pending = "" if m.group(2) else group
            for t in targets:
                if t != here:
                    found.append((path.relative_to(ROOT), no, here, t))
    return found


def main():
    layers = layer_table()
    bad = []
    modules = {top_module(p) for p in SRC.rglob("*.rs")} - {"main", "cli", "lib"}
    for m in sorted(modules - set(layers)):
        bad.append(f"src/{m}: module not placed in the layer table of docs/architecture.md")
    listing = "--list" in sys.argv[1:]
    for path, no, here, there in edges():
        if there not in layers or here not in layers:
            continue
        ok = layers[there] < layers[here]
        if listing:
            print(f"{'ok ' if ok else 'BAD'} {here} ({layers[here]}) -> {there} ({layers[there]})  {path}:{no}")
        if not ok:
            bad.append(
                f"{path}:{no}: `{here}` (layer {layers[here]}) imports `{there}` "
                f"(layer {layers[there]}); a module may only use lower layers"
            )
    if bad:
        print("\n".join(bad), file=sys.stderr)
        print(f"layering check: {len(bad)} problem(s); the layers are in docs/architecture.md",
              file=sys.stderr)
        return 1
    print(f"layering check: {len(modules)} modules, every crate:: edge points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
