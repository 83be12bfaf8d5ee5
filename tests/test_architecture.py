"""The layering the package layout promises, checked on the code itself.

- Pure components (``data/``, ``training/``, ``evaluation/``, ``models/``, ``results/``, ``config``, ``fileio``) never
  import Ray: each is imported in a fresh interpreter and ``ray`` must not be in ``sys.modules`` afterwards.
- Ray appears only in ``roles/`` and in the entry points ``sweep.py`` (which starts it) and ``evaluate.py`` (which
  reads a finished run's Tune state and checkpoints).
- The library reaches worlds only through ``envs``' registry: no module outside ``envs/`` imports a concrete world
  adapter (tests of that very world excepted), and ``envs`` never imports ``anyorder_ray`` (no cycle).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "anyorder_ray"
PURE_PACKAGES = ("data", "training", "evaluation", "models", "results")
PURE_MODULES = ("anyorder_ray.config", "anyorder_ray.fileio")
RAY_PACKAGE = "roles"
ENTRY_POINTS = ("sweep.py", "evaluate.py")  # the python -m commands
CONCRETE_WORLDS = {"envs.babyai", "envs.textworld"}  # every adapter module the registry names


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _pure_modules() -> list[str]:
    found = [_module_name(p) for pkg in PURE_PACKAGES for p in sorted((LIBRARY / pkg).rglob("*.py"))]
    return sorted(set(found) | set(PURE_MODULES))


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` in ``path`` names (at any depth, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def test_the_registry_names_exactly_the_concrete_worlds_checked_here():
    from envs.registry import _WORLDS

    assert set(_WORLDS.values()) == CONCRETE_WORLDS


def test_pure_components_do_not_import_ray():
    """Import every pure module in a fresh interpreter and look at what got loaded (transitively)."""
    modules = _pure_modules()
    assert len(modules) > 20, modules  # the layout really has these packages
    code = (
        "import importlib, json, sys\n"
        f"bad = {{}}\nfor m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    if 'ray' in sys.modules:\n"
        "        bad[m] = sorted(k for k in sys.modules if k.split('.')[0] == 'ray')[:3]\n"
        "        break\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bad == {}, f"a pure module pulled in Ray (first offender, in import order): {bad}"


@pytest.mark.parametrize("module", _pure_modules())
def test_no_pure_module_names_ray_in_its_imports(module):
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    ray_imports = {m for m in _imports(path) if m == "ray" or m.startswith("ray.")}
    roles = {m for m in _imports(path) if m.startswith(f"anyorder_ray.{RAY_PACKAGE}")}
    assert not ray_imports and not roles, f"{module} imports {sorted(ray_imports | roles)}"


def test_ray_is_imported_only_by_the_roles_and_the_entry_points():
    allowed = {LIBRARY / name for name in ENTRY_POINTS} | set((LIBRARY / RAY_PACKAGE).rglob("*.py"))
    offenders = [
        str(p.relative_to(ROOT))
        for p in sorted(LIBRARY.rglob("*.py"))
        if p not in allowed and any(m == "ray" or m.startswith("ray.") for m in _imports(p))
    ]
    assert offenders == []


def test_only_envs_imports_a_concrete_world():
    offenders = []
    for path in sorted([*ROOT.glob("anyorder_ray/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]):
        named = _imports(path) & CONCRETE_WORLDS
        own_test = {f"envs.{path.stem.removeprefix('test_')}"}  # tests/test_babyai.py tests envs.babyai itself
        if named - own_test:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(named)}")
    assert offenders == []


def test_envs_never_imports_the_library():
    offenders = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "envs").rglob("*.py"))
        if any(m == "anyorder_ray" or m.startswith("anyorder_ray.") for m in _imports(p))
    ]
    assert offenders == []


def test_each_constant_has_one_definition():
    """IGNORE_INDEX, the unit kinds and the mask modes are defined once; everything else imports them."""
    patterns = {"IGNORE_INDEX =": 0, "UNIT_KINDS": 0, "class MaskMode": 0, "KIND_IDS =": 0, "def atomic_write": 0}
    for path in [*LIBRARY.rglob("*.py"), *(ROOT / "envs").rglob("*.py")]:
        for line in path.read_text().splitlines():
            for pattern in patterns:
                if line.startswith(pattern) or (pattern == "UNIT_KINDS" and line.startswith("UNIT_KINDS:")):
                    patterns[pattern] += 1
    assert patterns == dict.fromkeys(patterns, 1)
