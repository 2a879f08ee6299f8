"""Progress output: a tqdm bar on a terminal, plain lines in a log; counts with their nouns."""

from __future__ import annotations

import io

import pytest

from musicssl.cli import counted
from musicssl.progress import LINE_INTERVAL, LineProgress, format_seconds, line_interval, progress_bar, redraws


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert "\r" not in text and (not text or text.endswith("\n")), repr(text)
    return text.splitlines()


def test_lines_come_at_most_once_an_interval_and_once_at_the_end():
    clock, out = Clock(), io.StringIO()
    with LineProgress(total=1000, desc="mel cache", unit="track", file=out, interval=30, clock=clock) as bar:
        for second in range(1, 101):  # 10 tracks a second for 100 s
            clock.now += 1
            bar.update(10)
            bar.set_postfix(skipped=second // 50, refresh=False)
            if second == 60:
                assert len(lines_of(out)) == 2
    written = lines_of(out)
    # At 30 s, 300 of 1000 done: 70 s left at that rate; 60 s: 600, 40 s left; 90 s: 900, 10 s left.
    assert written == [
        "mel cache: 300/1000 tracks (30%), 30 s, about 1 min 10 s left, skipped=0",
        "mel cache: 600/1000 tracks (60%), 1 min 0 s, about 40 s left, skipped=1",
        "mel cache: 900/1000 tracks (90%), 1 min 30 s, about 10 s left, skipped=1",
        "mel cache: 1000/1000 tracks in 1 min 40 s, skipped=2",
    ]


def test_short_work_writes_one_line_and_work_cut_short_says_where_it_stopped():
    clock, out = Clock(), io.StringIO()
    with LineProgress(total=23, desc="note bank (once)", unit="instrument", file=out, clock=clock) as bar:
        clock.now += 6.4
        bar.update(23)
    assert lines_of(out) == ["note bank (once): 23/23 instruments in 6 s"]

    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with LineProgress(total=64, desc="corpus", unit="track", file=out, clock=clock) as bar:
            clock.now += 75
            bar.update(1)  # 75 s since the start: a line
            raise KeyboardInterrupt
    assert lines_of(out) == ["corpus: 1/64 tracks (1%), 1 min 15 s, about 1 h 18 min left",
                             "corpus: stopped at 1/64 tracks after 1 min 15 s"]
    bar.close()  # a second close writes nothing more
    assert len(lines_of(out)) == 2


def test_units_and_totals():
    clock, out = Clock(), io.StringIO()
    for total, unit in [(1, "fit"), (2, "fit"), (None, "it"), (3, "steps"), (2, "")]:
        bar = LineProgress(total=total, desc="d", unit=unit, file=out, clock=clock)
        bar.update(1 if total == 1 else 2)
        bar.close()
    assert lines_of(out) == ["d: 1/1 fit in 0 s", "d: 2/2 fits in 0 s", "d: 2 it in 0 s",
                             "d: stopped at 2/3 steps after 0 s", "d: 2/2 in 0 s"]
    disabled = LineProgress(total=5, desc="quiet", file=out, interval=0, clock=clock, disable=True)
    disabled.update(5)
    disabled.close()
    assert len(lines_of(out)) == 5


def test_a_closed_output_does_not_stop_the_work(monkeypatch):
    out = io.StringIO()
    bar = LineProgress(total=2, desc="x", file=out, interval=0)
    out.close()
    bar.update(2)
    bar.close()
    assert bar.n == 2
    # A process started with its standard error closed (2>&-) has sys.stderr None (before: an AttributeError as the
    # bar closed, after the work, which was lost with it).
    monkeypatch.setattr("sys.stderr", None)
    bar = progress_bar(total=2, desc="x", mininterval=0)
    assert isinstance(bar, LineProgress)
    bar.update(2)
    bar.close()


def test_a_terminal_gets_a_tqdm_bar_and_anything_else_lines():
    from tqdm import tqdm

    terminal, log = Terminal(), io.StringIO()
    assert redraws(terminal) and not redraws(log)
    closed = io.StringIO()
    closed.close()
    assert not redraws(closed)
    bar = progress_bar(total=3, desc="corpus", unit="track", file=terminal, mininterval=0)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    bar = progress_bar(total=3, desc="corpus", unit="track", file=log, mininterval=0, dynamic_ncols=True)
    assert isinstance(bar, LineProgress)
    bar.update(3)
    bar.close()
    assert lines_of(log) == ["corpus: 3/3 tracks in 0 s"]
    quiet = progress_bar(total=3, desc="corpus", file=terminal, disable=True)
    before = terminal.getvalue()
    quiet.update(3)
    quiet.close()
    assert terminal.getvalue() == before


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (59.4, "59 s"), (59.6, "1 min 0 s"), (3599, "59 min 59 s"),
                                               (3600, "1 h 0 min"), (7449, "2 h 4 min"), (-3, "0 s")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_counted():
    assert [counted(n, "trial") for n in (0, 1, 2)] == ["0 trials", "1 trial", "2 trials"]
    assert counted(1, "process", "processes") == "1 process" and counted(3, "process", "processes") == "3 processes"


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MUSICSSL_PROGRESS_SECONDS", raising=False)
    assert line_interval() == LINE_INTERVAL == 30
    monkeypatch.setenv("MUSICSSL_PROGRESS_SECONDS", " 0 ")
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(total=3, desc="every step", unit="step", file=out, clock=clock)
    for _ in range(3):
        clock.now += 2
        bar.update()
    bar.close()
    assert lines_of(out) == ["every step: 1/3 steps (33%), 2 s, about 4 s left",
                             "every step: 2/3 steps (66%), 4 s, about 2 s left", "every step: 3/3 steps in 6 s"]
    monkeypatch.setenv("MUSICSSL_PROGRESS_SECONDS", "300")
    assert line_interval() == 300
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("MUSICSSL_PROGRESS_SECONDS", bad)
        with pytest.warns(RuntimeWarning, match=f"MUSICSSL_PROGRESS_SECONDS='{bad}' is not a number of seconds >= 0; "
                                                "progress lines come every 30 s"):
            assert line_interval() == LINE_INTERVAL
