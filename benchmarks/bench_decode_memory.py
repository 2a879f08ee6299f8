"""How much memory the mel cache takes to turn one long track into its log-mel, against the code before.

A ``--minutes``-long track (tones and noise; stereo 44.1 kHz, or ``--rate`` and ``--channels``) is written in each
of ``--formats``; then, in a
fresh process per run, it is turned into the cache's float16 log-mel (16 kHz, the cache's default
``LogMel``, peak-normalised, one torch thread, as a cache build does) by:

- ``whole``, the baseline, the code before 2026-12-07 written out: ``soundfile.read`` of the whole file, its
  down-mix, ``soxr.resample`` of the whole, and ``LogMel`` on the whole track;
- ``today``: ``musicssl.audio.load_audio`` (a block of the file at a time into a soxr stream) and
  ``LogMel.track`` (a chunk of the STFT at a time), as ``musicssl.data.cache`` does.

Each process imports everything and decodes a short file first; then its peak resident size is reset
(``/proc/self/clear_refs``, Linux) and measured (``VmHWM``) around the work. The runs alternate, ``--repeats``
times each. ``RESULT`` lines give today's peak growth and seconds over the baseline's (medians); each run's
log-mel is hashed, and the benchmark fails if the two ways give different numbers.

    python benchmarks/bench_decode_memory.py [--minutes 10] [--formats flac mp3] [--repeats 2] [--rate 44100]
        [--channels 2]

(``--rate 22050 --channels 1 --formats mp3`` is the case a first version read differently: its blocks were read
with ``SoundFile.read``, whose seek after each read resynchronised the MP3 decoder.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from musicssl.cli import int_in

SAMPLE_RATE = 44100
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
SUBTYPES = {"flac": "PCM_16", "mp3": "MPEG_LAYER_III", "wav": "PCM_16", "ogg": "VORBIS"}

# One run, in its own process: argv = [way, path]; prints one JSON line.
RUN = r"""
import hashlib, json, sys, time
import numpy as np, soundfile, soxr, torch
from musicssl.audio import LogMel, load_audio
from musicssl.data.cache import STORE_DTYPE, LogMelConfig

torch.set_num_threads(1)
way, path, short = sys.argv[1:4]
module = LogMelConfig().module()

def whole(path):  # the code before, written out
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    audio = soxr.resample(mono, rate, 16000, quality="HQ").astype(np.float32, copy=False)
    peak = float(np.max(np.abs(audio)))
    with torch.no_grad():
        mel = module(torch.from_numpy(audio / np.float32(peak)))
    return np.ascontiguousarray(mel.numpy().T, dtype=STORE_DTYPE)

def today(path):  # musicssl.data.cache's way
    audio = load_audio(path, 16000)
    peak = float(np.max(np.abs(audio)))
    return np.ascontiguousarray(module.track(audio, peak).T, dtype=STORE_DTYPE)

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

work = {"whole": whole, "today": today}[way]
work(short)  # libraries loaded, their first-use allocations made
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets VmHWM to the resident size now
before = kb("VmRSS")
start = time.perf_counter()
stored = work(path)
seconds = time.perf_counter() - start
print(json.dumps({"growth_kb": kb("VmHWM") - before, "seconds": seconds, "frames": stored.shape[0],
                  "sha256": hashlib.sha256(stored.tobytes()).hexdigest()}))
"""


def write_track(path: Path, minutes: float, subtype: str, seed: int = 0, rate: int = SAMPLE_RATE,
                channels: int = 2) -> None:
    """``minutes`` of tones and noise (each channel its own noise and level), written a minute at a time."""
    import soundfile

    rng = np.random.default_rng(seed)
    total = int(round(minutes * 60 * rate))
    with soundfile.SoundFile(str(path), "w", rate, channels, subtype=subtype) as file:
        for start in range(0, total, 60 * rate):
            t = np.arange(start, min(total, start + 60 * rate)) / rate
            tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * np.floor(t % 8)) * t)
            file.write(np.stack([(1 - 0.2 * channel) * tone + 0.05 * rng.standard_normal(t.shape)
                                 for channel in range(channels)], axis=1).astype(np.float32))


def run_once(way: str, path: Path, short: Path) -> dict:
    completed = subprocess.run([sys.executable, "-c", RUN, way, str(path), str(short)], capture_output=True,
                               text=True, timeout=1800)
    if completed.returncode != 0:
        raise SystemExit(f"the {way} run on {path.name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the track (default 10)")
    parser.add_argument("--formats", nargs="+", choices=sorted(SUBTYPES), default=["flac", "mp3"],
                        help="the track's formats (default flac mp3)")
    parser.add_argument("--repeats", type=int_in(1), default=2, help="runs of each way per format (default 2)")
    parser.add_argument("--rate", type=int_in(8000, 192000), default=SAMPLE_RATE, help="the track's sample rate (default 44100)")
    parser.add_argument("--channels", type=int_in(1, 8), default=2, help="the track's channels (default 2)")
    args = parser.parse_args(argv)
    if not 0.1 <= args.minutes <= 240:
        parser.error(f"argument --minutes: expected 0.1 to 240, got {args.minutes:g}")
    if "mp3" in args.formats and (args.rate not in MP3_RATES or args.channels > 2):
        parser.error(f"--formats mp3 takes --rate {', '.join(map(str, MP3_RATES))} and --channels 1 or 2 (MPEG audio), "
                     f"got --rate {args.rate} --channels {args.channels}")
    if not Path("/proc/self/clear_refs").exists():
        parser.error("this benchmark reads /proc/self (Linux)")

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as folder:
        short = Path(folder) / "short.flac"
        write_track(short, 0.05, SUBTYPES["flac"], seed=1)
        for fmt in args.formats:
            path = Path(folder) / f"track.{fmt}"
            print(f"writing {args.minutes:g} min of {args.channels}-channel {args.rate / 1000:g} kHz {fmt} ...", flush=True)
            write_track(path, args.minutes, SUBTYPES[fmt], rate=args.rate, channels=args.channels)
            runs: dict[str, list[dict]] = {"whole": [], "today": []}
            for _ in range(args.repeats):
                for way in runs:  # alternated, so that the machine's load falls on both
                    runs[way].append(run_once(way, path, short))
                    last = runs[way][-1]
                    print(f"  {fmt} {way:5s}: peak growth {last['growth_kb'] / 1024:7.1f} MB, {last['seconds']:6.2f} s, "
                          f"{last['frames']} frames", flush=True)
            hashes = {run["sha256"] for way in runs for run in runs[way]}
            if len(hashes) != 1:
                raise SystemExit(f"{fmt}: the two ways gave different log-mels ({len(hashes)} different hashes)")
            growth = {way: statistics.median(run["growth_kb"] for run in runs[way]) / 1024 for way in runs}
            seconds = {way: statistics.median(run["seconds"] for run in runs[way]) for way in runs}
            print(f"{fmt}: the same log-mel both ways (sha256 {hashes.pop()[:12]}); peak growth per minute of audio: "
                  f"whole {growth['whole'] / args.minutes:.1f} MB, today {growth['today'] / args.minutes:.1f} MB")
            print(f"RESULT {fmt} peak memory today / whole: {growth['today'] / growth['whole']:.3f} "
                  f"({growth['today']:.1f} MB against {growth['whole']:.1f} MB for {args.minutes:g} min)")
            print(f"RESULT {fmt} seconds today / whole: {seconds['today'] / seconds['whole']:.3f} "
                  f"({seconds['today']:.2f} s against {seconds['whole']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
