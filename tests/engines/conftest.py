"""Fixtures of the engine tests (``triton_interpreter`` is the suite's, in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from engines import Engine


@pytest.fixture(autouse=True)
def _engine_fixture(request):
    """The fixture that the test's ``engine`` parameter names (:attr:`Engine.fixture`)."""
    callspec = getattr(request.node, "callspec", None)
    engine = callspec.params.get("engine") if callspec is not None else None
    if isinstance(engine, Engine) and engine.fixture is not None:
        request.getfixturevalue(engine.fixture)
