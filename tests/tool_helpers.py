"""Loading a script of ``tools/`` (not a package) as a module, and running its ``main`` with
command-line arguments, in the test process."""
import sys

from training_helpers import load_tool  # noqa: F401  (re-exported for the tool tests)


def run_main(monkeypatch, tool, *args):
    """``tool.main()`` with ``sys.argv`` = the script's name + ``args`` (as strings)."""
    monkeypatch.setattr(sys, "argv", [f"{tool.__name__}.py", *map(str, args)])
    tool.main()
