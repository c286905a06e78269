"""The import floors of docs/DESIGN.md, checked from the source (no module is imported): a module imports only
modules on its own floor or below, and no modules import each other in a circle."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# docs/DESIGN.md "Import floors", bottom up: the first part of the module path below grit_jax -> its floor.
FLOORS = {"errors": 1, "sharding": 2, "common_types": 2, "fileio": 2, "data": 3, "modeling": 3, "objectives": 3,
          "flops": 3, "convert": 4, "contract": 5, "recipe_flags": 6, "training": 7, "inference": 8, "perf": 8,
          "demo": 9, "cli": 9, "commands": 9}


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, "grit_jax")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
  """Module -> the grit_jax modules it imports anywhere in its body (lazy imports included)."""
  edges = {}
  for name, path in modules.items():
    deps = set()
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grit_jax"):
        deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                 for a in node.names}
      elif isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.startswith("grit_jax")}
    edges[name] = deps - {name}
  return edges


def _floor(module: str) -> int:
  parts = module.split(".")
  return 9 if len(parts) == 1 else FLOORS[parts[1]]  # the package itself (grit_jax/__init__) is the public surface


def test_every_import_points_down_and_none_in_a_circle():
  modules = _modules()
  assert set(m.split(".")[1] for m in modules if "." in m) <= set(FLOORS), "a new top-level module needs a floor"
  edges = _imports(modules)
  up = sorted(f"{m} -> {d}" for m, deps in edges.items() for d in deps if _floor(d) > _floor(m))
  assert up == []
  packages = {m for m, p in modules.items() if p.endswith("__init__.py")}  # re-exports, not dependencies
  state, circles = {}, []

  def visit(m, path):
    state[m] = "open"
    for d in sorted(edges[m] - packages):
      if state.get(d) == "open":
        circles.append(path[path.index(d):] + [d])
      elif d in modules and d not in state:
        visit(d, path + [d])
    state[m] = "done"

  for m in sorted(set(modules) - packages):
    if m not in state:
      visit(m, [m])
  assert circles == []
