"""Data of d2ssod. Importing the package registers the built-in datasets (:mod:`.builtin`);
nothing is read or generated until one of them is loaded."""
from . import builtin  # noqa: F401
