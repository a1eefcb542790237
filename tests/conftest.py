"""Shared fixtures live in tests/plugins/, one module per real service the tests start on 127.0.0.1."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

pytest_plugins = [
    "tests.plugins.ray_cluster",
    "tests.plugins.s3",
    "tests.plugins.blackbox",
]
