"""Fixtures of the modeling tests."""
import pytest

from sed_helpers import build_sed_model


@pytest.fixture(scope="module")
def sed_model():
    """The demo SED student (seeded, training mode), one per test module."""
    return build_sed_model()
