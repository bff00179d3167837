#!/usr/bin/env python3
"""Writes the values table of helm/berth/README.md from values.yaml's `# --` comments
(helm-docs' format), and the version line from Chart.yaml. With --check it changes
nothing and exits 1 if the README is not what it would write, or if a value has no
`# --` comment. Run it through helm/gen-readme, which brings PyYAML."""

import json
import os
import re
import sys

import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "berth")
KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(\s|$)")
DOC = re.compile(r"^(\s*)# -- ?(.*)$")
DEFAULT = re.compile(r"^\s*# @default -- ?(.*)$")
MORE = re.compile(r"^\s*# ?(.*)$")


def lookup(values, path):
    v = values
    for p in path:
        v = v[p]
    return v


def kind(v):
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "object"
    return "null"


def rows(text, values):
    out, problems = [], []
    stack = []            # (indent, key) of the enclosing mappings
    pending = None        # [indent, description lines, default override]
    skip_below = None     # indent of a documented key whose block is skipped
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            pending = None
            continue
        indent = len(line) - len(line.lstrip())
        if skip_below is not None:
            if indent > skip_below:
                continue
            skip_below = None
        m = DEFAULT.match(line)
        if m and pending:
            pending[2] = m.group(1)
            continue
        m = DOC.match(line)
        if m:
            pending = [indent, [m.group(2)], None]
            continue
        if line.lstrip().startswith("#"):
            m = MORE.match(line)
            if pending and m:
                pending[1].append(m.group(1))
            continue
        if line.lstrip().startswith("- "):
            continue
        m = KEY.match(line)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [m.group(2)]
        value = lookup(values, path)
        if pending and pending[0] == indent:
            out.append((".".join(path), kind(value), pending[2], value, " ".join(pending[1]).strip()))
            skip_below = indent
            pending = None
            continue
        pending = None
        if isinstance(value, dict) and value:
            stack.append((indent, m.group(2)))
            continue
        problems.append(f"values.yaml:{n}: {'.'.join(path)} has no `# --` comment")
    return out, problems


def cell(s):
    return s.replace("|", "\\|")


def table(entries):
    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for key, typ, override, value, desc in entries:
        default = override if override is not None else "`" + json.dumps(value, separators=(",", ":")) + "`"
        lines.append(f"| {cell(key)} | {typ} | {cell(default)} | {cell(desc)} |")
    return "\n".join(lines)


def between(text, name, body):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + body + "\n" + text[j:]


def main():
    check = "--check" in sys.argv[1:]
    with open(os.path.join(CHART, "values.yaml")) as f:
        text = f.read()
    values = yaml.safe_load(text)
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        meta = yaml.safe_load(f)
    entries, problems = rows(text, values)
    readme_path = os.path.join(CHART, "README.md")
    with open(readme_path) as f:
        readme = f.read()
    badges = (f"![Version: {meta['version']}](https://img.shields.io/badge/Version-{meta['version']}-informational?style=flat-square) "
              f"![Type: {meta['type']}](https://img.shields.io/badge/Type-{meta['type']}-informational?style=flat-square) "
              f"![AppVersion: {meta['appVersion']}](https://img.shields.io/badge/AppVersion-{meta['appVersion']}-informational?style=flat-square)")
    new = between(between(readme, "badges", badges), "values", table(entries))
    for p in problems:
        print(p)
    if check:
        if new != readme:
            print("helm/berth/README.md is not up to date with values.yaml: run helm/gen-readme")
            sys.exit(1)
    elif new != readme:
        with open(readme_path, "w") as f:
            f.write(new)
        print("wrote helm/berth/README.md")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
