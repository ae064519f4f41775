"""The code's shape: what may import what, and who may touch the pipeline's insides."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / d for d in ("runtime", "export", "calib", "transforms", "scripts")]
PIPELINE = ROOT / "runtime" / "pipeline.py"


def _modules() -> list[Path]:
    return sorted(p for d in SOURCES for p in d.rglob("*.py"))


def _pipeline_privates() -> set[str]:
    """Names of Pipeline's private methods and attributes (self._x = ... in its methods)."""
    tree = ast.parse(PIPELINE.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Pipeline"]
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.startswith("__"):
            names.add(node.name)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.ctx, ast.Store)
        ):
            names.add(node.attr)
    return names


def test_no_module_reaches_into_the_pipeline():
    """Nothing outside runtime/pipeline.py subclasses Pipeline, patches it, or uses its privates on
    a pipeline object (tools use its hooks: observers, feeds taps, backend factory)."""
    privates = _pipeline_privates()
    assert privates, "Pipeline has no private members? the scan is broken"
    found = []
    for path in _modules():
        if path == PIPELINE:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", getattr(b, "attr", None)) == "Pipeline" for b in node.bases
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} subclasses Pipeline")
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "setattr"
            ):
                args = [ast.unparse(a) for a in node.args]
                if len(args) >= 2 and "pipeline" in args[0].lower() and args[1].strip("'\"") in privates:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} patches {args[0]}.{args[1]}")
            if isinstance(node, ast.Attribute) and node.attr in privates:
                owner = ast.unparse(node.value)
                if owner != "self" and "pipeline" in owner.lower():
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {owner}.{node.attr}")
    assert not found, "\n".join(found)


def test_runtime_and_transforms_import_without_torch():
    code = (
        "import sys, pkgutil, importlib\n"
        "import vsal.runtime, vsal.transforms\n"
        "for pkg in (vsal.runtime, vsal.transforms):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if 'triton_models' in m.name:\n"
        "            continue  # Triton's Python backend loads these (it provides their imports)\n"
        "        importlib.import_module(m.name)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the torch-free packages pulled in {out.stdout.strip()}"
