"""--cpu_threads: the idle cores, read from /proc/stat, decide torch's thread count unless the user chose one."""

import os

import pytest

from coalign._cpu import choose_threads, idle_cores


def _stat(path, user, idle):
    path.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")


def test_idle_cores_from_two_readings(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    _stat(stat, 100, 100)

    def sleep(_):  # during the window: +50 busy and +50 idle jiffies, so half of the 2 cores were idle
        _stat(stat, 150, 150)

    monkeypatch.setattr("coalign._cpu.time.sleep", sleep)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert idle_cores(stat=stat) == pytest.approx(1.0)
    assert idle_cores(stat=tmp_path / "missing") is None


def test_choose_threads():
    assert choose_threads(None, 2, 1.0) == 1  # one core busy elsewhere: one thread
    assert choose_threads(None, 2, 1.9) == 2
    assert choose_threads(None, 2, 0.1) == 1  # never fewer than one
    assert choose_threads(None, 4, 16.0) == 4  # never more than torch's own choice
    assert choose_threads(None, 2, None) == 2  # unknown: torch's default
    assert choose_threads(3, 2, 0.0) == 3  # an explicit choice wins
    with pytest.raises(ValueError, match="--cpu_threads must be >= 1"):
        choose_threads(0, 2, 1.0)
