"""Stands in for vLLM's serve argument parser: the fake engine's, which ignores what it does not know."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))

from fake_engine import parse


class _Parser:
    def parse_args(self, argv):
        return parse(list(argv))


def make_arg_parser(parser):
    return _Parser()
