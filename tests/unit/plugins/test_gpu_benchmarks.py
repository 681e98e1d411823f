"""The GPU benchmarks' CPU smoke mode (``--device cpu``): the scripts that only ever run on a lent GPU for
minutes must not rot between leases. Each runs tiny shapes here (the Triton kernels under the interpreter)
and writes its JSON with every row's fields; without ``--device cpu`` and without CUDA they write nothing
and exit 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from support import REPO


def run(script, *args, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    return done, out


def test_verify_cost_smoke_writes_every_row(tmp_path):
    done, out = run("verify_cost_gpu.py", "--device", "cpu", "--models", "tiny", "--tokens", "1", "2",
                    "--batches", "1", "--repeats", "1", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["tokens"], r["graph_ms"]) for r in results["verify"]] == [(1, None), (2, None)]
    assert all(r["eager_ms"] > 0 for r in results["verify"] + results["draft"])
    assert {r["drafter"] for r in results["draft"]} >= {"medusa, 3 heads", "micro-step drafter, 2 drafts"}


def test_local_linear_smoke_checks_every_path_against_the_reference(tmp_path):
    pytest.importorskip("triton")
    done, out = run("local_linear_gpu.py", "--device", "cpu", "--decode", "16", "--prefill", "--batches", "1",
                    "--repeats", "1", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (decode,) = json.loads(out.read_text())["results"]["rows"]  # no prefill: the interpreter is slow
    assert set(decode["checked_relative_error"]) == {"local_linear", "direct", "one_pass"}
    errors = decode["checked_relative_error"]
    assert max(errors.values()) < 1e-2  # the outputs' bf16 rounding is a few 1e-3
    assert errors["one_pass"] == pytest.approx(errors["direct"], rel=1e-2)  # both solve exactly
    assert decode["one_pass_ms"] > 0 and decode["kind"] == "decode"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real thing")
@pytest.mark.parametrize("script", ["verify_cost_gpu.py", "local_linear_gpu.py", "sparse_attention_gpu.py"])
def test_without_cuda_nothing_is_written(script, tmp_path):
    done, out = run(script, tmp_path=tmp_path)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and not out.exists()
