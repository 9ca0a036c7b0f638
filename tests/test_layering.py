"""The package's layers (docs/usage.md, "Package layout"): every d2ssod module imports only from
its own unit or from units on lower layers (function-level imports included), and never a
private (``_name``) name of another module."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a unit is ``d2ssod.<first part>``. Units of one layer do not import each other.
LAYERS = [
    ("d2ssod.ddp", "d2ssod.demo"),
    ("d2ssod.data", "d2ssod.evaluation", "d2ssod.modeling"),
    ("d2ssod.methods",),
    ("d2ssod.config",),  # the shared keys; methods declare theirs through METHOD_REGISTRY
    ("d2ssod.engine",),  # the training core
    ("d2ssod.inference",),  # offline use of a checkpoint
    ("d2ssod.selection",),
    ("d2ssod.self_training",),
    ("d2ssod.tools_support",),
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module):
    """``d2ssod.x.y`` → ``d2ssod.x``; the package face ``d2ssod`` stays itself."""
    return ".".join(module.split(".")[:2])


def imports_of(source, module, is_package=False):
    """``(line, imported module, imported names)`` of every ``d2ssod`` import in ``source``
    (the code of ``module``), relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, ()) for a in node.names
                      if a.name.split(".")[0] == "d2ssod"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "d2ssod":
                continue
            names = tuple(a.name for a in node.names)
            if target == "d2ssod" or not node.module:  # ``from . import x``: modules
                found += [(node.lineno, f"{target}.{n}", ()) for n in names]
            else:
                found.append((node.lineno, target, names))
    return found


def violations(modules):
    """Imports that run up or sideways between units, and private names taken from another
    module: ``["file:line: what"]`` for ``modules = {module: (path, source, is_package)}``."""
    out = []
    for module, (path, source, is_package) in sorted(modules.items()):
        unit = unit_of(module)
        if unit == "d2ssod":  # the package face imports what registers itself
            continue
        if unit not in LAYER_OF:
            out.append(f"{path}: unit {unit} is on no layer of tests/test_layering.py")
            continue
        for line, target, names in imports_of(source, module, is_package):
            other = unit_of(target)
            if other != unit and (other not in LAYER_OF or LAYER_OF[other] >= LAYER_OF[unit]):
                out.append(f"{path}:{line}: {unit} imports {target}, a unit on "
                           f"{'its own' if LAYER_OF.get(other) == LAYER_OF[unit] else 'a higher'}"
                           f" layer")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                out.append(f"{path}:{line}: imports private {', '.join(private)} of {target}")
    return out


def package_modules():
    modules = {}
    for root, _, files in os.walk(os.path.join(REPO, "d2ssod")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                is_package = rel.endswith(".__init__")
                module = rel[: -len(".__init__")] if is_package else rel
                with open(path) as f:
                    modules[module] = (os.path.relpath(path, REPO), f.read(), is_package)
    return modules


def test_every_module_imports_only_from_lower_layers_and_no_private_names():
    modules = package_modules()
    units = {unit_of(m) for m in modules} - {"d2ssod"}
    assert units <= set(LAYER_OF), f"units on no layer: {sorted(units - set(LAYER_OF))}"
    assert violations(modules) == []


@pytest.mark.parametrize("module, source, expected", [
    # config (layer 4) from the engine (5): up
    ("d2ssod.config", "def f():\n    from d2ssod.engine.amp import x\n",
     "d2ssod/config.py:2: d2ssod.config imports d2ssod.engine.amp, a unit on a higher layer"),
    # data and modeling share a layer: sideways
    ("d2ssod.data.mappers", "from d2ssod.modeling import box_ops\n",
     "d2ssod/data/mappers.py:1: d2ssod.data imports d2ssod.modeling, a unit on its own layer"),
    # a relative import is resolved before it is judged
    ("d2ssod.engine.hooks", "from ..inference import predictor\n",
     "d2ssod/engine/hooks.py:1: d2ssod.engine imports d2ssod.inference, a unit on a higher "
     "layer"),
    ("d2ssod.inference.predictor", "from d2ssod.data.mappers import _to_tensor\n",
     "d2ssod/inference/predictor.py:1: imports private _to_tensor of d2ssod.data.mappers"),
])
def test_the_check_catches_an_upward_a_sideways_and_a_private_import(module, source, expected):
    path = module.replace(".", "/") + ".py"
    assert violations({module: (path, source, False)}) == [expected]
    # the same imports from a module of a higher layer are fine (private names aside)
    fine = violations({"d2ssod.tools_support.x": ("x.py", source.replace("_to_tensor", "f"),
                                                  False)})
    assert fine == []
