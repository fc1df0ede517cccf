"""Fixtures shared by the unit tests."""

from __future__ import annotations

import importlib
import sys

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def wrapper():
    """include/dbhost/pgops_wal_archive.py as the DB host imports it (its directory first on sys.path)."""
    sys.path.insert(0, str(REPO / "include" / "dbhost"))
    try:
        yield importlib.import_module("pgops_wal_archive")
    finally:
        sys.path.remove(str(REPO / "include" / "dbhost"))
