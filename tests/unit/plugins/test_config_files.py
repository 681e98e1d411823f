"""``AFTERBURNER_CONFIG`` naming something that is not a config file (issue #12, item 4): a directory, a
file that cannot be read, bytes that are not text, a huge file, a FIFO: each is one ``ConfigError`` line
naming the path and what is wrong (never a traceback, never a read of the whole huge file)."""

import os
from pathlib import Path

import pytest

from afterburner.plugins.config import ENV_VAR, ConfigError, from_env


def _error(path) -> str:
    with pytest.raises(ConfigError) as caught:
        from_env({ENV_VAR: str(path)})
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400 and str(path) in message
    return message


def test_a_directory(tmp_path):
    assert "names a directory, not a file" in _error(tmp_path)


def test_a_file_that_cannot_be_read(tmp_path, monkeypatch):
    config = tmp_path / "ab.json"
    config.write_text("{}")
    real = Path.read_bytes

    def denied(self):  # chmod 000 does not stop root, who runs these tests in CI containers
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert "cannot be read: Permission denied" in _error(config)


def test_bytes_that_are_not_text(tmp_path):
    binary = tmp_path / "ab.json"
    binary.write_bytes(b"{\"enabled\": \xff\xfe}")
    assert "is not UTF-8 text (byte 12: invalid start byte)" in _error(binary)


def test_a_huge_file_is_refused_by_its_size(tmp_path, monkeypatch):
    huge = tmp_path / "ab.json"
    huge.write_text("{" + " " * (3 << 20) + "}")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("a huge file must not be read"))
    assert "is 3,145,730 bytes; a config file may be at most 1,048,576" in _error(huge)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "ab.json"
    os.mkfifo(fifo)
    assert "which is not a regular file" in _error(fifo)  # reading it would block forever
