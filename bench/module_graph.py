"""The package's module graph from the AST: modules, lines per package, import layers, cycles.

  python bench/module_graph.py [--root=laser_jax] [--rev=GIT_REV]

Every `import` of a `laser_jax` module counts, at module level or inside a function (a lazy
import is still a dependency). A node of the package graph is a subpackage (`laser_jax/rl/`,
...) or a top-level module (`laser_jax/cli.py`, ...); a subpackage's `__main__.py` is its own
node (`data.__main__`), since an entry point sits above everything it runs. The layer of a node
is 0 if it imports no other node, else 1 + the largest layer among those it imports; a cycle
between nodes is reported (and has no layers). With --rev the tree is read from that git
revision (`git show REV:PATH`), so the graph of another commit needs no checkout.
"""
from __future__ import annotations

import argparse
import ast
import collections
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 400  # issue 26 item 9: no module over ~400 lines without a reason at its top


def _files(package: str, rev: str | None) -> dict[str, str]:
  """{path relative to the repository root: source} of every .py file under `package`."""
  if rev:
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, package], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
            for n in names if n.endswith(".py")}
  out = {}
  for base, _, files in os.walk(os.path.join(ROOT, package)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.relpath(os.path.join(base, f), ROOT)
        with open(os.path.join(ROOT, path)) as fh:
          out[path] = fh.read()
  return out


def _module(path: str) -> str:
  parts = path[:-3].split(os.sep)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(module: str, is_pkg: bool, tree: ast.AST, modules: set[str]) -> set[str]:
  """The package's modules that `module` imports (`from a import b` counts a.b if a module)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".") if is_pkg else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:  # import a.b.c: the longest prefix that is a module
        name = name.rpartition(".")[0]
      if name and name != module:
        out.add(name)
  return out


def _node(module: str, root: str) -> str:
  """The graph node of a module: its subpackage, or itself if top-level (entry points apart)."""
  rest = module[len(root) + 1:].split(".") if module != root else ["__init__"]
  if len(rest) == 1:
    return rest[0]
  return ".".join(rest[:2]) if rest[-1] == "__main__" else rest[0]


def _reason(source: str) -> bool:
  """Whether the module's docstring states why it is over the limit ("Over 400 lines ...")."""
  doc = ast.get_docstring(ast.parse(source)) or ""
  return f"over {LIMIT} lines" in " ".join(doc.lower().split())


def graph(root: str = "laser_jax", rev: str | None = None):
  files = _files(root, rev)
  modules = {_module(p): p for p in files}
  is_pkg = {m: p.endswith("__init__.py") for m, p in modules.items()}
  lines = {m: files[p].count("\n") for m, p in modules.items()}
  deps = {m: _imports(m, is_pkg[m], ast.parse(files[p]), set(modules)) for m, p in modules.items()}
  node_of = {m: _node(m, root) for m in modules}
  edges = collections.defaultdict(set)
  for m, ds in deps.items():
    for d in ds:
      a, b = node_of[m], node_of[d]
      if a != b and b != "__init__":
        edges[a].add(b)
  nodes = sorted(set(node_of.values()) - {"__init__"})
  # Layers (longest path to a sink), cycles by DFS.
  layer, state, cycles = {}, {}, []

  def visit(n, stack):
    if state.get(n) == "done":
      return layer[n]
    if state.get(n) == "open":
      cycles.append(stack[stack.index(n):] + [n])
      return 0
    state[n] = "open"
    layer[n] = 1 + max((visit(d, stack + [n]) for d in sorted(edges[n])), default=-1)
    state[n] = "done"
    return layer[n]

  for n in nodes:
    visit(n, [])
  return dict(files=files, modules=modules, lines=lines, deps=deps, node_of=node_of,
              edges=edges, nodes=nodes, layer=layer, cycles=cycles)


def report(g, root: str) -> str:
  out = []
  pkgs = collections.defaultdict(list)  # subpackage (or "(top level)") -> its modules
  for m in g["modules"]:
    parts = m.split(".")
    is_pkg = g["modules"][m].endswith("__init__.py")
    pkgs[parts[1] if len(parts) > 2 or (is_pkg and len(parts) == 2) else "(top level)"].append(m)
  total = sum(g["lines"].values())
  out.append(f"{len(g['modules'])} modules, {total} lines, {len(g['nodes'])} graph nodes\n")
  out.append(f"| package | modules | lines | largest module (lines) | over {LIMIT} lines |")
  out.append("|---|---:|---:|---|---|")
  for p in sorted(pkgs, key=lambda p: (p == "(top level)", p)):
    ms = pkgs[p]
    big = max(ms, key=lambda m: g["lines"][m])
    over = [f"{m.rsplit('.', 1)[-1]} {g['lines'][m]}" + ("" if not _reason(g["files"][g["modules"][m]])
                                                          else " (reason stated)")
            for m in sorted(ms) if g["lines"][m] > LIMIT]
    name = p if p == "(top level)" else f"{root}/{p}/"
    out.append(f"| {name} | {len(ms)} | {sum(g['lines'][m] for m in ms)} | "
               f"{big.rsplit('.', 1)[-1]} ({g['lines'][big]}) | {', '.join(over) or '-'} |")
  out.append("")
  if g["cycles"]:
    out.append("cycles between nodes: " + "; ".join(" -> ".join(c) for c in g["cycles"]))
  else:
    out.append("cycles between nodes: none")
  out.append("")
  out.append("| layer | node | imports |")
  out.append("|---:|---|---|")
  for n in sorted(g["nodes"], key=lambda n: (g["layer"].get(n, -1), n)):
    out.append(f"| {g['layer'].get(n, '?')} | {n} | {', '.join(sorted(g['edges'][n])) or '-'} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="laser_jax")
  parser.add_argument("--rev", default=None, help="a git revision to read instead of the work tree")
  args = parser.parse_args()
  print(report(graph(args.root, args.rev), args.root))


if __name__ == "__main__":
  sys.exit(main())
