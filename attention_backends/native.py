"""afterburner's small C ops for the CPU hot path, compiled on this machine at first use and loaded with ctypes.

A library is built from one C file next to its caller with the system's C compiler (``$CC``, else ``cc``;
``-O3 -march=native``), into ``~/.cache/afterburner/native/<name>-<hash>.so`` (``AFTERBURNER_CACHE``
moves the folder); the hash covers the source, the compiler's version and this CPU's flags, so a cache
shared between machines never loads code built for another CPU. It needs no Python headers and no torch
headers (the ops take raw pointers), so a build takes well under a second.

When the library cannot be had (no compiler, a failed build, ``AFTERBURNER_NATIVE=0``), ``load`` returns
the ``NativeUnavailable`` that says why, and the caller runs its torch path and logs that reason once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


class NativeUnavailable(RuntimeError):
    """Why a native op cannot be used here (the message says what to do)."""


def cache_dir() -> Path:
    return Path(os.environ.get("AFTERBURNER_CACHE", Path.home() / ".cache" / "afterburner")) / "native"


def _compiler() -> str:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C compiler ({compiler!r} not found; install one, e.g. "
                                "`apt-get install gcc`, or set CC)")
    return compiler


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def build(source: Path) -> Path:
    """The compiled library of ``source`` (built now unless cached); NativeUnavailable on failure."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join([source.read_text(), version, _cpu_flags(), *_FLAGS]).encode()).hexdigest()
    target = cache_dir() / f"{source.stem}-{digest[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:  # other processes may build the same: rename
        partial = Path(work) / target.name
        result = subprocess.run([compiler, *_FLAGS, "-o", str(partial), str(source), "-lm"], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise NativeUnavailable(f"building {source.name} with {compiler} failed: "
                                    f"{result.stderr.strip().splitlines()[-1:] or result.returncode}")
        os.replace(partial, target)
    logger.info("afterburner: built %s", target)
    return target


@cache
def load(source: Path) -> ctypes.CDLL | NativeUnavailable:
    """The library of ``source``, or the NativeUnavailable that says why not (once per process)."""
    if os.environ.get("AFTERBURNER_NATIVE", "1") == "0":
        return NativeUnavailable("AFTERBURNER_NATIVE=0")
    try:
        return ctypes.CDLL(str(build(source)))
    except NativeUnavailable as error:
        return error
    except OSError as error:  # a library that does not load
        return NativeUnavailable(str(error))
