"""progress.bar on a terminal (tqdm), off a terminal (plain lines), and the listeners."""
import fcntl
import os
import re
import struct
import sys
import termios
import threading

import pytest

from lowvram_stepvideo.pipeline import progress


def _plain_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def test_plain_lines_every_few_percent_without_carriage_returns(capsys):
    with progress.bar("denoise", total=40) as b:
        for _ in range(40):
            b.update()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = _plain_lines(err)
    percents = [int(re.search(r"\((\d+)%\)", ln)[1]) for ln in lines]
    assert percents == list(range(0, 101, 5))   # one line per 5 % of 40 steps, from the start to the end
    assert lines[0].startswith("denoise: 0/40 steps (0%)")
    assert lines[-1].startswith("denoise: 40/40 steps (100%)") and "elapsed" in lines[-1]
    assert "left" in lines[10] and "left" not in lines[-1]


def test_plain_lines_for_few_steps_show_each_step(capsys):
    with progress.bar("decode", total=3, unit="tile") as b:
        for _ in range(3):
            b.update()
    lines = _plain_lines(capsys.readouterr().err)
    assert [ln.split(" (")[0] for ln in lines] == ["decode: 0/3 tiles", "decode: 1/3 tiles", "decode: 2/3 tiles",
                                                   "decode: 3/3 tiles"]


def test_plain_bytes_are_shown_in_gb_and_an_aborted_bar_records_where_it_stopped(capsys):
    with pytest.raises(KeyError):
        with progress.bar("quantize", total=4 * 10**9, unit="B") as b:
            b.update(10**9)
            b.update(10**7)            # same 5 % bucket: no line
            raise KeyError("stop")
    lines = _plain_lines(capsys.readouterr().err)
    assert [ln.split(",")[0] for ln in lines] == ["quantize: 0.00/4.00 GB (0%)", "quantize: 1.00/4.00 GB (25%)"]


def test_unknown_total_then_set_total(capsys):
    with progress.bar("decode", unit="tile") as b:
        b.set_total(2)
        b.update(2)
    lines = _plain_lines(capsys.readouterr().err)
    assert lines[0].startswith("decode: 0 tiles,")
    assert lines[-1].startswith("decode: 2/2 tiles (100%)")


def test_show_false_prints_and_reports_nothing(capsys):
    seen = []
    with progress.listen(lambda *a: seen.append(a)), progress.bar("denoise", 2, show=False) as b:
        b.update(2)
    assert capsys.readouterr().err == "" and seen == []


def test_listener_sees_start_every_update_and_total(capsys):
    seen = []
    with progress.listen(lambda *a: seen.append(a)):
        with progress.bar("denoise", total=3, initial=1) as b:
            b.update()
            b.update()
        with progress.bar("decode", unit="tile") as b:
            b.set_total(4)
            b.update(4)
    with progress.bar("after", total=1) as b:       # the listener is gone outside its block
        b.update()
    assert seen == [("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3),
                    ("decode", 0, None), ("decode", 0, 4), ("decode", 4, 4)]


def test_listeners_are_per_thread_context(capsys):
    main_seen, worker_seen = [], []

    def worker():
        with progress.listen(lambda *a: worker_seen.append(a)):
            with progress.bar("worker", total=2) as b:
                b.update(2)

    with progress.listen(lambda *a: main_seen.append(a)):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        with progress.bar("main", total=1) as b:
            b.update()
    assert {d for d, *_ in worker_seen} == {"worker"}
    assert {d for d, *_ in main_seen} == {"main"}


@pytest.fixture
def pty_stderr(monkeypatch):
    """A new pseudo-terminal; yields (set_size, read_output). set_size makes its slave side sys.stderr (pytest
    sets sys.stderr again between a fixture's setup and the test, so this happens in the test)."""
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w", buffering=1)

    def set_size(rows: int, cols: int) -> None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        monkeypatch.setattr(sys, "stderr", stream)

    def read() -> str:
        stream.flush()
        os.set_blocking(master, False)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    yield set_size, read
    stream.close()
    os.close(master)


def test_a_terminal_with_a_size_gets_a_tqdm_bar(pty_stderr):
    set_size, read = pty_stderr
    set_size(24, 100)
    assert progress.stderr_is_terminal()
    with progress.bar("denoise", total=4) as b:
        for _ in range(4):
            b.update()
    out = read()
    assert "\r" in out and "4/4" in out and "|" in out and "elapsed" not in out


def test_a_terminal_without_a_size_gets_plain_lines(pty_stderr):
    set_size, read = pty_stderr
    set_size(0, 0)
    assert not progress.stderr_is_terminal()
    with progress.bar("denoise", total=2) as b:
        b.update(2)
    out = read().replace("\r\n", "\n")      # the tty turns each newline into CR LF
    assert "\r" not in out
    assert [ln.split(" (")[0] for ln in _plain_lines(out)] == ["denoise: 0/2 steps", "denoise: 2/2 steps"]


def test_plain_line_format():
    assert progress.plain_line("denoise", 12, 30, "step", 62) == \
        "denoise: 12/30 steps (40%), 1:02 elapsed, about 1:33 left"
    assert progress.plain_line("step_llm", 1, None, "block", 3725) == "step_llm: 1 block, 1:02:05 elapsed"
