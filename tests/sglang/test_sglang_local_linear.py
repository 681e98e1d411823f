"""``--attention-backend afterburner-local-linear`` on the real sglang modules: the parser accepts it and
the factory builds it (the model's own lambda before the config's); run by hand on real SGLang pools and
ForwardBatch objects (shuffled slots, a radix-shared prefix, chunked prefill, a mixed step, decode) every
step's output is ``local_linear_paged`` on each request's keys and values in position order, it is
local-linear attention (float64 reference), and at a huge lambda it is SGLang's own softmax output; a real
CPU Engine with it at a huge lambda gives torch_native's greedy tokens, and at a small one other tokens; a
model trained with it (``afterburner train lla``) answers in an Engine as the training code does."""

import json
from types import SimpleNamespace

import pytest
import torch
from engine_setup import GREEDY, LONG_PROMPTS, MAX_NEW_TOKENS, MIXED_PROMPTS, SCRIPTS, cpu_env, engine_run
from pool_setup import D, PoolWorld, make_runner
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from afterburner.attention_backends.local_linear.method import MODEL_LAMBDA_KEY
from afterburner.attention_backends.local_linear.paged import local_linear_paged
from afterburner.attention_backends.local_linear.reference import local_linear_reference
from afterburner.plugins import stats
from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.sglang import attention
from afterburner.plugins.sglang.output_backend import OutputAttnBackend
from support.lla import LOGPROB_ATOL, mqar_prompts, reference
from support.lla import MAX_TOKENS as LLA_MAX_TOKENS
from support.worker import run_worker_or_fail

pytestmark = pytest.mark.sglang

NAME = "afterburner-local-linear"


def _runner(page_size: int = 1, hf_config=None) -> SimpleNamespace:
    return make_runner(page_size, tokens=1024, max_context_len=256, hf_config=hf_config)


def _backend(monkeypatch, lam: float, runner: SimpleNamespace) -> OutputAttnBackend:
    monkeypatch.setenv("AFTERBURNER_CONFIG", json.dumps({"attention": {"local_linear": {"lam": lam}}}))
    return attention._create(runner, name=NAME)


def test_real_parser_accepts_the_backend_and_the_factory_builds_it(monkeypatch):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    args = prepare_server_args(["--model-path", "unused", "--device", "cpu", "--attention-backend", NAME])
    assert args.attention_backend == NAME
    attention.check_flags(args, AfterburnerConfig())
    backend = _backend(monkeypatch, lam=3.0, runner=_runner())
    assert isinstance(backend, OutputAttnBackend) and backend.op.lam_of(0) == 3.0
    trained = SimpleNamespace(num_hidden_layers=1, **{MODEL_LAMBDA_KEY: [0.25]})
    assert _backend(monkeypatch, lam=3.0, runner=_runner(hf_config=trained)).op.lam_of(0) == 0.25
    mismatched = SimpleNamespace(num_hidden_layers=2, **{MODEL_LAMBDA_KEY: [1.0]})
    with pytest.raises(ConfigError, match=f"--attention-backend {NAME}: {MODEL_LAMBDA_KEY}"):
        _backend(monkeypatch, lam=3.0, runner=_runner(hf_config=mismatched))


class World(PoolWorld):
    """``pool_setup``'s pools and steps, with each step's expected output."""

    def expected(self, rows: list[int], counts: list[int], q: torch.Tensor, lam: float, *, reference=False):
        """Each request's outputs computed on its own contiguous keys (one slot per block, in order)."""
        out, start = [], 0
        for row, n in zip(rows, counts, strict=True):
            keys, values = self.sequence(row)
            if reference:
                out.append(local_linear_reference(q[start:start + n], keys, values, scale=D**-0.5, lam=lam).float())
            else:
                length = keys.shape[0]
                out.append(local_linear_paged(q[start:start + n], keys.unsqueeze(1), values.unsqueeze(1),
                                              torch.arange(length)[None], torch.tensor([length]),
                                              torch.tensor([0, n]), scale=D**-0.5, lam=lam))
            start += n
        return torch.cat(out)


def _world(monkeypatch, lam: float, page_size: int) -> World:
    runner = _runner(page_size)
    return World(runner, _backend(monkeypatch, lam, runner), page_size)


# A long, chunked prefill; a request sharing A's first 32 tokens (radix hit); a mixed step (A decodes one
# token beside C's prefill); then decode steps of all three.
STEPS = [({1: 40}, ForwardMode.EXTEND), ({1: 25, 2: 7}, ForwardMode.EXTEND), ("share", None),
         ({3: 20, 1: 1}, ForwardMode.MIXED), ({1: 1, 2: 1, 3: 1}, ForwardMode.DECODE),
         ({1: 1, 2: 1, 3: 1}, ForwardMode.DECODE)]


@pytest.mark.parametrize("page_size", [1, 4])
def test_every_step_is_local_linear_over_the_pool(monkeypatch, page_size):
    lam = 0.5
    world = _world(monkeypatch, lam, page_size)
    calls = stats.attention("local_linear").forward_calls
    for extend, mode in STEPS:
        if extend == "share":
            world.share(3, source=1, tokens=32)
            continue
        q, ours, _ = world.step(extend, mode)
        rows, counts = list(extend), list(extend.values())
        torch.testing.assert_close(ours, world.expected(rows, counts, q, lam), rtol=1e-6, atol=1e-6)
        reference = world.expected(rows, counts, q, lam, reference=True)
        torch.testing.assert_close(ours, reference, rtol=2e-3, atol=2e-3)
    assert stats.attention("local_linear").forward_calls - calls == len(STEPS) - 1


def test_a_huge_lambda_is_sglangs_softmax(monkeypatch):
    world = _world(monkeypatch, lam=1e9, page_size=4)
    for extend, mode in STEPS:
        if extend == "share":
            world.share(3, source=1, tokens=32)
            continue
        if mode == ForwardMode.MIXED:  # torch_native takes it as an extend
            mode = ForwardMode.EXTEND
        _, ours, stock = world.step(extend, mode, also_stock=True)
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_engine_with_a_huge_lambda_gives_the_stock_tokens(engine, tiny_model, tmp_path):
    """The session engine runs SGLang's torch_native: the reference."""
    dense = [out["output_ids"] for out in engine[0].generate(MIXED_PROMPTS, dict(GREEDY))]
    huge = engine_run(tiny_model, "local-linear", {"attention": {"local_linear": {"lam": 1e9}}}, tmp_path / "huge")
    assert huge["mixed"] == dense
    assert huge["after_mixed"]["forward_calls"] > 0
    assert huge["after_long"]["forward_calls"] > huge["after_mixed"]["forward_calls"]
    assert [len(ids) for ids in huge["long"]] == [MAX_NEW_TOKENS] * len(LONG_PROMPTS)
    small = engine_run(tiny_model, "local-linear", {"attention": {"local_linear": {"lam": 0.05}}}, tmp_path / "small")
    assert small["mixed"] != dense, "a small lambda must change what the model computes"


@pytest.mark.slow
def test_a_model_trained_with_it_answers_as_the_training_code(short_lla_model):
    """SGLang serves the ``afterburner train lla`` model (a short run) with its own per-layer lambdas:
    greedy answers to MQAR queries token-identical to the training code's model, log-probs within 2e-3."""
    prompts = mqar_prompts()
    served, _ = run_worker_or_fail(SCRIPTS / "lla_model_engine.py", short_lla_model, json.dumps(prompts),
                                   LLA_MAX_TOKENS, env=cpu_env(), unset=["AFTERBURNER_DISABLE"], timeout=480)
    expected = reference(short_lla_model, prompts)
    assert [s["tokens"] for s in served] == [e["tokens"] for e in expected]
    for s, e in zip(served, expected, strict=True):
        assert s["logprobs"] == pytest.approx(e["logprobs"], abs=LOGPROB_ATOL)
