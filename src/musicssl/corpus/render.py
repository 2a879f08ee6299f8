"""Render composed songs to audio: a SoundFont note bank, overlap-add synthesis and per-track mastering.

Rendering a whole song with a SoundFont synthesiser costs ~0.4-0.6 s of CPU per 30 s song, too slow for
600 songs in a minute on two cores. SoundFont synthesis is linear: a song is the sum of its notes,
each note's sound depending only on (program, pitch, velocity, duration). So every note the corpus
can use is rendered once with ``midirenderer`` (the General MIDI SoundFont that ships with
pretty_midi), resampled to 16 kHz and stored on disk as a *note bank*; a song is then synthesised
by adding bank samples into a buffer with numpy.

The bank is rendered dry (reverb and chorus sends at 0; each track gets its own reverb later), and
measured on TimGM6mb.sf2 velocity changes only the level of a note (amplitude proportional to
velocity squared, the SoundFont default curve; spectral centroid within a few percent), so the bank
holds one velocity layer and scales it. A note shorter than the bank's is released at its end with
the program's release rate (SoundFont release envelopes fall linearly in dB), measured from the bank
note's own release. A closed hi-hat chokes an open one and a re-struck key releases the note it
interrupts, as the synthesiser does.

After synthesis each track gets a random mix (part balance), EQ (low and high shelves, sometimes a
low-pass), reverb (exponentially decaying noise impulse response) and level, so that no single
spectral cue gives the tags away.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import soundfile
import soxr
from scipy import signal

from musicssl.corpus.compose import (
    DRUM_NOTE_SECONDS,
    DRUM_NOTES,
    NOTE_MAX_SECONDS,
    Song,
)
from musicssl.corpus.tags import DRUM_KITS, INSTRUMENTS, ROLE_PITCH_RANGES
from musicssl.interrupts import held_signals, interrupts_kept, quiet_worker
from musicssl.machine import usable_cpus
from musicssl.paths import remove_abandoned_staging, staging_folder

__all__ = [
    "SAMPLE_RATE",
    "RENDER_SAMPLE_RATE",
    "BankSpec",
    "NoteBank",
    "MixFactors",
    "soundfont_path",
    "bank_notes",
    "bank_directory",
    "ensure_note_bank",
    "render_midi_bytes",
    "render_song_directly",
    "synthesize",
    "draw_mix",
    "master",
    "write_flac",
    "default_workers",
    "worker_pool",
]

SAMPLE_RATE = 16000
RENDER_SAMPLE_RATE = 48000  # midirenderer always renders 48 kHz stereo
BANK_FORMAT_VERSION = 3
HI_HAT_NOTES = frozenset({42, 44, 46})  # one exclusive class in GM kits: a new hat cuts the ringing one
CUT_FADE_SECONDS = 0.01
RELEASE_FLOOR_DB = 80.0  # a released note is followed until it is this far below its level at note-off
# GM controllers set to 0 on every channel: reverb send (91) and chorus send (93).
DRY_CONTROLLERS = (91, 93)
CYMBAL_NOTES = frozenset({DRUM_NOTES["crash"], DRUM_NOTES["ride"], DRUM_NOTES["bell"]})


def soundfont_path() -> Path:
    """The General MIDI SoundFont shipped inside the pretty_midi package (``TimGM6mb.sf2``)."""
    import pretty_midi

    path = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: pretty_midi's SoundFont is missing; reinstall pretty_midi (`pip install --force-reinstall pretty_midi`)"
        )
    return path


@dataclass(frozen=True)
class BankSpec:
    """What the note bank holds and how it was rendered.

    Pitched notes are held ``sustain_seconds`` (the composer's longest note) and captured
    ``tail_seconds`` past note-off; drum notes are held ``drum_note_seconds`` and captured
    ``drum_capture_seconds`` (``cymbal_capture_seconds`` for crash and ride, which ring longer).
    Every note is played at ``reference_velocity``. Samples are trimmed where they fall ``trim_db``
    below their own peak and end with a ``end_fade_seconds`` fade where the capture cut them.
    """

    sample_rate: int = SAMPLE_RATE
    sustain_seconds: float = NOTE_MAX_SECONDS
    tail_seconds: float = 0.8
    drum_note_seconds: float = DRUM_NOTE_SECONDS
    drum_capture_seconds: float = 1.5
    cymbal_capture_seconds: float = 3.0
    gap_seconds: float = 0.05
    reference_velocity: int = 100
    trim_db: float = 70.0
    end_fade_seconds: float = 0.05

    def capture_seconds(self, is_drum: bool, pitch: int) -> float:
        """How long a note's sound is captured from its onset."""
        if not is_drum:
            return self.sustain_seconds + self.tail_seconds
        return self.cymbal_capture_seconds if pitch in CYMBAL_NOTES else self.drum_capture_seconds


def bank_notes() -> list[tuple[bool, int, int]]:
    """Every ``(is_drum, program, pitch)`` the composer can play: each instrument over the union of
    its roles' pitch ranges at every semitone, and each drum kit's voices."""
    notes: list[tuple[bool, int, int]] = []
    for spec in INSTRUMENTS:
        pitches: set[int] = set()
        for role in spec.roles:
            low, high = ROLE_PITCH_RANGES[role]
            pitches.update(range(low, high + 1))
        notes.extend((False, spec.program, pitch) for pitch in sorted(pitches))
    for kit in DRUM_KITS:
        notes.extend((True, kit.program, pitch) for pitch in sorted(set(DRUM_NOTES.values())))
    return notes


def _key(is_drum: bool, program: int, pitch: int) -> str:
    return f"{'drum' if is_drum else 'program'}{program}:{pitch}"


def bank_directory(cache_dir: Path, spec: BankSpec = BankSpec()) -> Path:
    """The bank's folder in ``cache_dir``, named by a hash of everything that determines its content."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(soundfont_path().read_bytes()).digest())
    digest.update(json.dumps({"version": BANK_FORMAT_VERSION, "spec": asdict(spec), "notes": bank_notes()}).encode())
    return Path(cache_dir) / f"notebank-{digest.hexdigest()[:12]}"


def render_midi_bytes(midi_bytes: bytes, soundfont: bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Render a MIDI file with midirenderer and return float32 mono at ``sample_rate``."""
    import midirenderer

    wave = midirenderer.render_wave_from(soundfont, midi_bytes)
    stereo, rate = soundfile.read(io.BytesIO(wave), dtype="float32", always_2d=True)
    mono = (stereo[:, 0] + stereo[:, -1]) * np.float32(0.5)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return mono.astype(np.float32, copy=False)


def render_song_directly(song: Song, soundfont: bytes | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Render ``song`` with midirenderer in one go (the slow reference the note bank replaces).

    Dry, like the bank (reverb and chorus sends at 0). Returns float32 mono of exactly
    ``song.seconds`` at ``sample_rate``, unmixed and unmastered.
    """
    import pretty_midi

    soundfont = soundfont_path().read_bytes() if soundfont is None else soundfont
    midi = song.to_midi()
    for track in midi.instruments:
        track.control_changes.extend(pretty_midi.ControlChange(number, 0, 0.0) for number in DRY_CONTROLLERS)
    # The renderer stops at the last event; a silent controller event keeps it running to the end.
    marker = pretty_midi.Instrument(program=0)
    marker.control_changes.append(pretty_midi.ControlChange(7, 100, song.seconds + 0.5))
    midi.instruments.append(marker)
    buffer = io.BytesIO()
    midi.write(buffer)
    audio = render_midi_bytes(buffer.getvalue(), soundfont, sample_rate)
    length = int(round(song.seconds * sample_rate))
    return np.pad(audio, (0, max(0, length - len(audio))))[:length]


def _render_bank_chunk(job: tuple[bool, int, list[int], BankSpec, bytes]) -> tuple[bool, int, list[np.ndarray], float]:
    """Render one instrument's notes in one MIDI file, spaced apart, and slice them out.

    Returns the float32 samples per pitch and, for pitched instruments, the release rate in dB/s
    (measured on the middle note).
    """
    import pretty_midi

    is_drum, program, pitches, spec, soundfont = job
    held = spec.drum_note_seconds if is_drum else spec.sustain_seconds
    rate = spec.sample_rate
    # Slots start on whole samples at the bank's rate so that slicing after resampling is exact.
    captures = [int(round(spec.capture_seconds(is_drum, pitch) * rate)) for pitch in pitches]
    gap = int(round(spec.gap_seconds * rate))
    starts = np.concatenate([[0], np.cumsum([capture + gap for capture in captures])])
    midi = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    track = pretty_midi.Instrument(program=program, is_drum=is_drum)
    track.control_changes.extend(pretty_midi.ControlChange(number, 0, 0.0) for number in DRY_CONTROLLERS)
    for pitch, start in zip(pitches, starts):
        track.notes.append(pretty_midi.Note(spec.reference_velocity, pitch, start / rate, start / rate + held))
    track.control_changes.append(pretty_midi.ControlChange(7, 100, starts[-1] / rate))
    midi.instruments.append(track)
    buffer = io.BytesIO()
    midi.write(buffer)
    audio = render_midi_bytes(buffer.getvalue(), soundfont, rate)
    audio = np.pad(audio, (0, max(0, int(starts[-1]) - len(audio))))
    end_fade = int(round(spec.end_fade_seconds * rate))
    samples = []
    for pitch, start, capture in zip(pitches, starts, captures):
        note = audio[start : start + capture].copy()
        peak = float(np.abs(note).max())
        if peak == 0.0:
            raise RuntimeError(f"the SoundFont rendered silence for {_key(is_drum, program, pitch)}")
        loud = np.flatnonzero(np.abs(note) > peak * 10.0 ** (-spec.trim_db / 20.0))
        note = note[: loud[-1] + 1]
        if len(note) == capture:  # still sounding when the capture ends: fade instead of a click
            note[-end_fade:] *= np.linspace(1.0, 0.0, end_fade, dtype=np.float32)
        samples.append(note)
    release = 0.0
    if not is_drum:
        middle = len(samples) // 2
        release = _release_db_per_second(samples[middle], int(round(held * rate)), rate)
    return is_drum, program, samples, release


def _release_db_per_second(note: np.ndarray, note_off: int, sample_rate: int) -> float:
    """How fast the release envelope falls, in dB per second, measured on one rendered note.

    The level (10 ms RMS, in dB) is fitted with a line over the 0.4 s before note-off and over the
    release after it (until 40 dB down or the end); the release rate is the slope after minus the
    natural decay before, so that a decay already in the bank samples is not counted twice.
    """
    frame = sample_rate // 100
    frames = len(note) // frame
    level = 10.0 * np.log10(np.mean(note[: frames * frame].astype(np.float64).reshape(frames, frame) ** 2, axis=1) + 1e-20)
    off = note_off // frame
    before = level[max(0, off - 40) : off - 2]
    after = level[off + 2 :]
    if len(before) < 5 or len(after) < 3:
        return 1000.0
    down = np.flatnonzero(after < before[-1] - 40.0)
    after = after[: max(3, down[0] if len(down) else len(after))]
    seconds = np.arange(max(len(before), len(after))) * frame / sample_rate
    slope_before = np.polyfit(seconds[: len(before)], before, 1)[0]
    slope_after = np.polyfit(seconds[: len(after)], after, 1)[0]
    # Only a natural decay is discounted: a swell before note-off (bowed strings, pads) is not decay.
    return float(np.clip(min(slope_before, 0.0) - slope_after, 10.0, 2000.0))


class NoteBank:
    """Rendered notes, memory-mapped from disk: int16 samples plus an index.

    ``note(is_drum, program, pitch)`` returns the int16 samples of one note at the reference
    velocity; multiply by ``scale`` for float amplitude.
    """

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        index_path = directory / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{directory}: not a note bank (no index.json); build one with ensure_note_bank()")
        meta = json.loads(index_path.read_text())
        self.directory = directory
        self.spec = BankSpec(**meta["spec"])
        self.scale = float(meta["scale"])
        self.entries: dict[str, tuple[int, int]] = {key: (int(start), int(length)) for key, (start, length) in meta["entries"].items()}
        self.release_db_per_second: dict[int, float] = {
            int(program): float(value) for program, value in meta["release_db_per_second"].items()
        }
        self.samples = np.load(directory / "samples.npy", mmap_mode="r")

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    def note(self, is_drum: bool, program: int, pitch: int) -> np.ndarray:
        try:
            start, length = self.entries[_key(is_drum, program, pitch)]
        except KeyError:
            raise KeyError(
                f"note bank {self.directory} has no {_key(is_drum, program, pitch)}; the composer played a note "
                "outside the catalogue's ranges (see tags.ROLE_PITCH_RANGES)"
            ) from None
        return self.samples[start : start + length]

    def nbytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())


def ensure_note_bank(cache_dir: Path, workers: int = 1, spec: BankSpec = BankSpec(), progress: bool = False) -> NoteBank:
    """The note bank in ``cache_dir``, rendering it first if it is missing (atomically: a half-written
    bank is never mistaken for a finished one), with ``workers`` processes and a progress bar if asked."""
    from musicssl.progress import progress_bar

    directory = bank_directory(cache_dir, spec)
    if (directory / "index.json").is_file():
        return NoteBank(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:  # before the rendering (10 s or more): a folder that cannot be written fails at once, by its name
        os.rmdir(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    except OSError as error:
        raise type(error)(error.errno, error.strerror or str(error), str(directory.parent)) from None
    soundfont = soundfont_path().read_bytes()
    by_instrument: dict[tuple[bool, int], list[int]] = {}
    for is_drum, program, pitch in bank_notes():
        by_instrument.setdefault((is_drum, program), []).append(pitch)
    jobs = [(is_drum, program, pitches, spec, soundfont) for (is_drum, program), pitches in by_instrument.items()]
    # Longest jobs first so that the last worker to finish is not the one that started a long job late.
    order = sorted(range(len(jobs)), key=lambda number: -len(jobs[number][2]) * (1 if jobs[number][0] else 3))
    ordered = [jobs[number] for number in order]
    with progress_bar(total=len(jobs), desc="note bank (once)", unit="instrument", disable=not progress,
                      dynamic_ncols=True) as bar:
        finished = []
        if workers > 1:
            with worker_pool(min(workers, len(jobs))) as pool, interrupts_kept():
                for result in pool.imap_unordered(_render_bank_chunk, ordered):
                    finished.append(result)
                    bar.update()
        else:
            for job in ordered:
                finished.append(_render_bank_chunk(job))
                bar.update()
    results = {(is_drum, program): (samples, release) for is_drum, program, samples, release in finished}

    peak = max(float(np.abs(note).max()) for samples, _ in results.values() for note in samples)
    scale = peak / 32767.0
    entries: dict[str, tuple[int, int]] = {}
    chunks = []
    offset = 0
    for (is_drum, program), pitches in by_instrument.items():  # catalogue order: the file is deterministic
        samples, _ = results[(is_drum, program)]
        for pitch, note in zip(pitches, samples):
            chunks.append(np.round(note / scale).astype(np.int16))
            entries[_key(is_drum, program, pitch)] = (offset, len(note))
            offset += len(note)
    meta = {
        "format_version": BANK_FORMAT_VERSION,
        "spec": asdict(spec),
        "scale": scale,
        "entries": entries,
        "release_db_per_second": {str(program): release for (is_drum, program), (_, release) in results.items() if not is_drum},
        "soundfont": str(soundfont_path()),
    }
    remove_abandoned_staging(directory.parent, f".{directory.name}.partial-")  # of renders killed here before
    staging = staging_folder(directory.parent, f".{directory.name}.partial-")
    try:
        np.save(staging / "samples.npy", np.concatenate(chunks))
        (staging / "index.json").write_text(json.dumps(meta))
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / "index.json").is_file():  # not another process finishing first: a real error
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return NoteBank(directory)


def synthesize(song: Song, bank: NoteBank, part_gains_db: dict[str, float] | None = None, extra_seconds: float = 0.0) -> np.ndarray:
    """Add up the bank samples of every note of ``song``; float32 mono of ``song.seconds + extra_seconds``.

    Notes are scaled by ``(velocity / reference_velocity) ** 2`` (the SoundFont velocity curve) and
    by their part's gain. A note that ends before the bank note did is released there: its sample is
    multiplied by the program's release envelope (linear in dB) down to -80 dB. A re-struck key
    releases the note it interrupts; a new hi-hat chokes the one ringing (10 ms fade).
    """
    rate = bank.sample_rate
    length = int(round((song.seconds + extra_seconds) * rate))
    output = np.zeros(length, dtype=np.float32)
    sustain_samples = int(round(bank.spec.sustain_seconds * rate))
    cut_fade = int(round(CUT_FADE_SECONDS * rate))
    choke_curve = np.linspace(1.0, 0.0, cut_fade, endpoint=False, dtype=np.float32)
    for part in song.parts:
        part_gain = 10.0 ** ((part_gains_db or {}).get(part.role, 0.0) / 20.0) * bank.scale
        release_rate = bank.release_db_per_second.get(part.program, 1000.0)
        release_samples = max(cut_fade, int(RELEASE_FLOOR_DB / release_rate * rate))
        release_curve = np.power(np.float32(10.0), -release_rate / 20.0 * np.arange(release_samples, dtype=np.float32) / rate)
        starts = [int(round(note.start * rate)) for note in part.notes]
        ends = [int(round(note.end * rate)) for note in part.notes]
        choke_at: list[int | None] = [None] * len(part.notes)
        last_by_key: dict[int, int] = {}
        for position, note in enumerate(part.notes):
            if part.is_drum:
                if note.pitch in HI_HAT_NOTES:
                    previous = last_by_key.get(-1)
                    if previous is not None and starts[position] > starts[previous]:
                        choke_at[previous] = starts[position] - starts[previous]
                    last_by_key[-1] = position
            else:
                previous = last_by_key.get(note.pitch)
                if previous is not None and starts[previous] < starts[position] < ends[previous]:
                    ends[previous] = starts[position]  # re-struck: the earlier note is released now
                last_by_key[note.pitch] = position
        for position, note in enumerate(part.notes):
            start = starts[position]
            if start >= length:
                continue
            sample = bank.note(part.is_drum, part.program, note.pitch)
            gain = np.float32(part_gain * (note.velocity / bank.spec.reference_velocity) ** 2)
            held = ends[position] - start
            if not part.is_drum and held < min(sustain_samples - 1, len(sample)):
                end = min(len(sample), held + release_samples)
                chunk = sample[:end] * gain
                chunk[held:] *= release_curve[: end - held]
            else:
                chunk = sample * gain
            choke = choke_at[position]
            if choke is not None and choke < len(chunk):
                chunk = chunk[: choke + cut_fade]
                chunk[choke:] *= choke_curve[: len(chunk) - choke]
            stop = min(length, start + len(chunk))
            output[start:stop] += chunk[: stop - start]
    return output


@dataclass(frozen=True)
class MixFactors:
    """Per-track production settings, drawn at random so that level, balance and colour carry no tag.

    Gains in dB; shelves are RBJ shelving biquads; ``lowpass_hz`` None means no low-pass;
    ``reverb_wet`` is the reverb's level relative to the dry signal, ``reverb_seconds`` its RT60;
    ``level_dbfs`` is the target RMS level of the finished track (lowered if the peak would clip).
    """

    part_gains_db: dict[str, float]
    low_shelf_hz: float
    low_shelf_db: float
    high_shelf_hz: float
    high_shelf_db: float
    lowpass_hz: float | None
    reverb_wet: float
    reverb_seconds: float
    level_dbfs: float


# Typical balance of a mix, in dB, around which each track's balance is drawn.
PART_LEVELS_DB = {"drums": 0.0, "bass": -1.0, "chords": -3.0, "melody": 0.0, "pad": -6.0}


def draw_mix(rng: np.random.Generator) -> MixFactors:
    """Draw a track's mix, EQ, reverb and level."""
    return MixFactors(
        part_gains_db={role: round(level + float(rng.uniform(-4.0, 4.0)), 2) for role, level in PART_LEVELS_DB.items()},
        low_shelf_hz=round(float(rng.uniform(80.0, 300.0)), 1),
        low_shelf_db=round(float(rng.uniform(-8.0, 8.0)), 2),
        high_shelf_hz=round(float(rng.uniform(1500.0, 5000.0)), 1),
        high_shelf_db=round(float(rng.uniform(-9.0, 6.0)), 2),
        lowpass_hz=round(float(rng.uniform(3500.0, 7500.0)), 1) if rng.random() < 0.3 else None,
        reverb_wet=round(float(rng.uniform(0.0, 0.6)), 3),
        reverb_seconds=round(float(rng.uniform(0.3, 2.5)), 2),
        level_dbfs=round(float(rng.uniform(-28.0, -14.0)), 2),
    )


def _shelf(frequency: float, gain_db: float, sample_rate: int, high: bool) -> np.ndarray:
    """RBJ audio-EQ-cookbook shelving biquad (slope 1) as one second-order section."""
    amplitude = 10.0 ** (gain_db / 40.0)
    omega = 2.0 * math.pi * frequency / sample_rate
    cos, alpha = math.cos(omega), math.sin(omega) / 2.0 * math.sqrt(2.0)
    root = 2.0 * math.sqrt(amplitude) * alpha
    sign = 1.0 if high else -1.0
    b0 = amplitude * ((amplitude + 1) + sign * (amplitude - 1) * cos + root)
    b1 = -2.0 * sign * amplitude * ((amplitude - 1) + sign * (amplitude + 1) * cos)
    b2 = amplitude * ((amplitude + 1) + sign * (amplitude - 1) * cos - root)
    a0 = (amplitude + 1) - sign * (amplitude - 1) * cos + root
    a1 = 2.0 * sign * ((amplitude - 1) - sign * (amplitude + 1) * cos)
    a2 = (amplitude + 1) - sign * (amplitude - 1) * cos - root
    return np.array([b0, b1, b2, a0, a1, a2]) / a0


def master(
    audio: np.ndarray, mix: MixFactors, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE, length: int | None = None
) -> tuple[np.ndarray, float]:
    """EQ, reverb and level for one track. Returns the float32 audio and its final RMS level in dBFS.

    The output is cut to ``length`` samples (default: all) after the reverb, so that ``audio`` may
    run on past the end and the reverb at the cut sounds as it would mid-song. The level is
    ``mix.level_dbfs`` unless the peak would pass 0.99, in which case the track is turned down
    until it does not (no clipping, no limiter colour).
    """
    sections = [_shelf(mix.low_shelf_hz, mix.low_shelf_db, sample_rate, high=False), _shelf(mix.high_shelf_hz, mix.high_shelf_db, sample_rate, high=True)]
    if mix.lowpass_hz is not None:
        sections.append(signal.butter(2, mix.lowpass_hz, fs=sample_rate, output="sos")[0])
    dry = signal.sosfilt(np.stack(sections), audio.astype(np.float64))
    if mix.reverb_wet > 0.0:
        response_length = int(mix.reverb_seconds * sample_rate)
        time = np.arange(response_length) / sample_rate
        noise = rng.standard_normal(response_length)
        # High frequencies die faster in a room: a one-pole low-pass darkens the tail.
        noise = signal.lfilter([0.35], [1.0, -0.65], noise)
        response = noise * np.exp(-6.9 * time / mix.reverb_seconds)
        predelay = int(rng.uniform(0.005, 0.03) * sample_rate)
        response = np.concatenate([np.zeros(predelay), response / math.sqrt(float(np.sum(response * response)))])
        # One float32 FFT convolution: ~2x faster than scipy's float64 oaconvolve at these lengths,
        # and float32's 1e-7 relative error is far below the 16-bit output's resolution.
        size = scipy.fft.next_fast_len(len(dry) + len(response) - 1, real=True)
        spectrum = scipy.fft.rfft(dry.astype(np.float32), size) * scipy.fft.rfft(response.astype(np.float32), size)
        wet = scipy.fft.irfft(spectrum, size)[: len(dry)]
        dry = dry + mix.reverb_wet * wet
    dry = dry[:length]
    rms = math.sqrt(float(np.mean(dry**2)))
    if rms == 0.0:
        raise RuntimeError("the synthesised track is silent; the composer produced no audible notes")
    output = dry * (10.0 ** (mix.level_dbfs / 20.0) / rms)
    peak = float(np.abs(output).max())
    if peak > 0.99:
        output *= 0.99 / peak
    final_level = 20.0 * math.log10(math.sqrt(float(np.mean(output**2))))
    return output.astype(np.float32), round(final_level, 2)


def write_flac(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``audio`` as 16-bit FLAC."""
    soundfile.write(str(path), audio, sample_rate, subtype="PCM_16", format="FLAC")


def worker_pool(processes: int) -> multiprocessing.pool.Pool:
    """A pool of ``processes`` workers, forked where the platform has it: they then start at once and
    need not re-import the caller's ``__main__`` (spawn fails for scripts fed on stdin). Workers use
    numpy/scipy/soundfile only. Each worker ignores Ctrl-C (the caller gets it and ends the pool) and
    ends on SIGTERM without a word (:func:`musicssl.interrupts.quiet_worker`): a forked worker starts
    with its parent's handlers (the search's, which turns SIGTERM into Ctrl-C), and the pool's end,
    which sends each worker a SIGTERM, printed a KeyboardInterrupt traceback of a worker under the
    corpus's progress bar. The workers start under :func:`musicssl.interrupts.held_signals`: a
    signal that came before a worker had set its handlers met the parent's (and raised there) or was
    dropped as the handler was reset, and left a worker that the pool's end waited for forever."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with held_signals():
        return multiprocessing.get_context(method).Pool(processes, initializer=quiet_worker, initargs=(os.getpid(),))


def default_workers() -> int:
    """One worker per CPU this process may use."""
    return usable_cpus()
