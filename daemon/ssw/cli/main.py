"""The ``ssw`` command: runs the roles in the foreground and talks to a running
loader for operators. Errors are one line on stderr with a distinct exit code
(:mod:`ssw.cli.exits`)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from ssw.cli.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, CliError
from ssw.cli.parser import build_parser
from ssw.cli.verbs import DEFAULT_CONFIG
from ssw.config import Config, load_config
from ssw.errors import ConfigError, SswError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out: Any = args.run(_config(args.config), args)
        if isinstance(out, int):
            return out  # the roles and the key verbs answer with an exit code
        if args.json and out is not None:
            print(json.dumps(out, indent=2))
    except ConfigError as exc:
        print(f"ssw: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CliError as exc:
        print(f"ssw: {exc}", file=sys.stderr)
        return exc.code
    except SswError as exc:
        print(f"ssw: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


def _config(path: str | None) -> Config:
    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return Config()
    return load_config(path or DEFAULT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
