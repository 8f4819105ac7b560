"""Stands in for vLLM's headless serve (a rank of a model across hosts): the fake rank."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))

from fake_engine import run_headless  # noqa: F401
