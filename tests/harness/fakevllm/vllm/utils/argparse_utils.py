"""Stands in for vLLM's FlexibleArgumentParser."""

import argparse

FlexibleArgumentParser = argparse.ArgumentParser
