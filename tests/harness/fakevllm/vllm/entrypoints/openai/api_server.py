"""Stands in for vLLM's entry point when tests put tests/harness/fakevllm on
PYTHONPATH: the loader's real command line then starts the fake engine."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))

from fake_engine import main

if __name__ == "__main__":
    main()
