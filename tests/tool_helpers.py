"""Loading a script of ``tools/`` (not a package) as a module, and running its ``main`` with
command-line arguments, in the test process."""
import importlib.util
import os
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def load_tool(name):
    """``tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(monkeypatch, tool, *args):
    """``tool.main()`` with ``sys.argv`` = the script's name + ``args`` (as strings)."""
    monkeypatch.setattr(sys, "argv", [f"{tool.__name__}.py", *map(str, args)])
    tool.main()
