"""Shared fixtures. The toy world is built once per machine (cached under $LDKE_CACHE or
~/.cache/ldke_peft) and loaded once per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def world():
    from ldke_peft.testing.toy_world import toy_world

    return toy_world()


@pytest.fixture(scope="session")
def world_pool(world):
    return world.negative_pool()


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
