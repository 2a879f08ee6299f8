"""Shared fixtures: small real audio datasets written by the tests themselves."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from musicssl.data.index import TrackIndex

# A background job of a script (a CI run, say) starts with SIGINT ignored, and so does every command it
# runs: a command line after this prefix gets Ctrl-C's default action, as in a terminal.
WITH_CTRL_C = [sys.executable, "-c",
               "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"]


needs_chromium = pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists() and not shutil.which("chromium"),
    reason="Chromium is not installed (Debian: apt install chromium; .ci/run installs it)")


def chromium_dom(page: Path, tmp_path: Path) -> str:
    """The page's DOM once headless Chromium has run its scripts (plotly has drawn its figures)."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # Software WebGL for the parallel coordinates: Chromium no longer falls back to it silently.
         "--disable-dev-shm-usage", "--enable-unsafe-swiftshader", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# What plotly.js draws on an axis it finds no data for: the range -1 to 4.
PLOTLY_EMPTY_AXIS_TICKS = ["\u22121", "0", "1", "2", "3", "4"]


def drawn_y_ticks(dom: str) -> dict[str, list[str]]:
    """The y-axis tick labels plotly drew in a DOM, per subplot (``"xy"``, ``"x2y2"``, ...; numbered in page
    order when the page holds several figures: ``"1:xy"``), as written (a minus is U+2212)."""
    ticks: dict[str, list[str]] = {}
    for number, figure in enumerate(dom.split('class="plot-container plotly"')[1:], start=1):
        for block in re.split(r'<g class="subplot ', figure)[1:]:
            name = block.split('"', 1)[0]
            labels = re.findall(r'class="ytick"[^>]*>\s*<text[^>]*data-unformatted="([^"]*)"', block)
            if labels:
                ticks.setdefault(f"{number}:{name}", []).extend(labels)
    return ticks


def run_main(main, arguments, capsys) -> tuple[int, str, str]:
    """A command's ``main(arguments)`` in the test process (torch, Lightning and Ray load once per test
    session, not once per command: several seconds each): its exit code (argparse's errors and
    ``parser.exit`` included), stdout and stderr. An exception that the command would show as a
    traceback fails the test. Each command also has tests that run it as its own process."""
    try:
        code = main(arguments)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def ctrl_c_handled():
    """Python's own Ctrl-C handler in this process during the test (see WITH_CTRL_C), then the one before."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


class SmallDisk:
    """A file system of its own (a tmpfs) at ``path``, ``size`` bytes, that a test can fill for real."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def fill(self, name: str = "filler") -> Path:
        """Write a file of zeros until the disk has no room left; its path (remove it to give the room back)."""
        path = self.path / name
        with open(path, "wb", buffering=0) as stream, contextlib.suppress(OSError):
            while True:
                stream.write(bytes(65536))
        return path


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[int], SmallDisk]]:
    """``small_disk(size, files=None)``: a tmpfs of ``size`` bytes (and room for ``files`` files and folders, its
    own included) mounted for the test (unmounted after it). Skipped where this process may not mount one
    (mounting needs root, or CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: int, files: int | None = None) -> SmallDisk:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small file system needs root")
        options = f"size={size}" + (f",nr_inodes={files}" if files is not None else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
        mounted.append(path)
        return SmallDisk(path)

    try:
        yield mount
    finally:
        for path in mounted:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def write_tonal_dataset(folder: Path, num_tracks: int = 48, seconds: float = 14.0, seed: int = 0) -> TrackIndex:
    """Tracks of a few harmonic tones with noise, tagged by their pitch class and by loudness.

    Real FLAC files at 16 kHz; splits 70/10/20 by position. Enough structure that a probe on
    embeddings has something to find, small enough for fast tests.
    """
    rng = np.random.default_rng(seed)
    audio_dir = folder / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    sample_rate = 16000
    time = np.arange(int(seconds * sample_rate)) / sample_rate
    records = []
    for number in range(num_tracks):
        pitch = [220.0, 277.2, 329.6, 415.3][number % 4]
        loud = number % 3 == 0
        notes = np.zeros_like(time)
        for start in np.arange(0.0, seconds, 0.5):
            frequency = pitch * rng.choice([1.0, 1.5, 2.0])
            # From the note's start on: before it its envelope is 0, and adding (-)0.0 changes no sample (the
            # same audio, to the bit, as computing every note over the whole track, in 40 % of the time).
            first = int(np.searchsorted(time, start))
            after = time[first:]
            envelope = np.exp(-8.0 * (after - start))
            notes[first:] += envelope * sum(np.sin(2 * np.pi * frequency * k * after) / k for k in (1, 2, 3))
        signal = 0.3 * notes / np.abs(notes).max() + 0.02 * rng.standard_normal(len(time))
        signal *= 1.0 if loud else 0.3
        path = audio_dir / f"track{number:03d}.flac"
        soundfile.write(path, signal.astype(np.float32), sample_rate)
        split = "train" if number < 0.7 * num_tracks else ("valid" if number < 0.8 * num_tracks else "test")
        records.append(
            {"track_id": f"t{number:03d}", "path": str(path), "split": split,
             "tags": [f"pitch---{int(pitch)}", "level---loud" if loud else "level---soft"]}
        )
    index = TrackIndex.from_records(records, name="tonal")
    index.to_csv(folder / "tracks.csv")
    return index


@pytest.fixture(scope="session")
def tonal_dataset(tmp_path_factory) -> Path:
    """Folder with ``tracks.csv`` and audio of :func:`write_tonal_dataset` (built once per session)."""
    folder = tmp_path_factory.mktemp("tonal")
    write_tonal_dataset(folder)
    return folder


@pytest.fixture(scope="session")
def tonal_data(tonal_dataset, tmp_path_factory):
    """The tonal dataset with its 64-mel cache built (the CPU preset's front-end)."""
    from musicssl.data.cache import LogMelConfig
    from musicssl.data.pipeline import prepare_data

    return prepare_data(
        tonal_dataset / "tracks.csv", LogMelConfig(n_mels=64), cache_dir=tmp_path_factory.mktemp("mels"),
        workers=0, verbose=False,
    )
