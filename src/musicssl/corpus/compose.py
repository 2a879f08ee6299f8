"""Compose multi-track songs (drums, bass, chords, melody, optional pad) from hidden generator factors.

A song is drawn in two steps. :func:`draw_factors` draws the factors the tags are made of (style,
mode, energy, tempo, instruments, drum kit, key) from a seeded generator; instruments and drum kit
are drawn independently of the style so that a probe cannot infer one from the other.
:func:`compose_song` then writes the parts note by note. The style fixes the rhythm patterns, swing,
chord vocabulary, bass line and tempo range; the energy fixes density and dynamics; the mode fixes
the scale and progressions.

Songs are built from 4-bar sections (verse, chorus, bridge) with drum fills at section ends, and no
two bars are copies of each other: drum patterns have optional hits, the melody of a repeated
section is a mutated copy of its motif, and every note is humanised in time and velocity. Two
segments of one song a few seconds apart therefore share the song's tags but not its content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pretty_midi

from musicssl.corpus.tags import (
    DRUM_KITS,
    INSTRUMENTS,
    ROLE_PITCH_RANGES,
    STYLE_NAMES,
    drum_kit_by_name,
    instrument_by_name,
    song_tags,
)

__all__ = [
    "Note",
    "Part",
    "Song",
    "SongFactors",
    "StyleSpec",
    "STYLES",
    "DRUM_NOTES",
    "KEY_NAMES",
    "NOTE_MAX_SECONDS",
    "DRUM_NOTE_SECONDS",
    "draw_factors",
    "compose_song",
    "song_midi_bytes",
]

# The note bank renders each note for this long; the composer never writes a longer note (a longer
# held chord is re-struck instead), so every note can be synthesised from the bank exactly.
NOTE_MAX_SECONDS = 2.5
NOTE_MIN_SECONDS = 0.04
# Drum hits all last this long: drum sounds in the SoundFont respond (a little) to note-off, and the
# note bank renders each drum sound with this length.
DRUM_NOTE_SECONDS = 0.1

KEY_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

# General MIDI percussion keys of the drum voices the patterns use.
DRUM_NOTES: dict[str, int] = {
    "kick": 36,
    "rim": 37,
    "snare": 38,
    "clap": 39,
    "tom_floor": 41,
    "hat": 42,
    "pedal": 44,
    "tom_low": 45,
    "open": 46,
    "tom_mid": 48,
    "crash": 49,
    "tom_high": 50,
    "ride": 51,
    "bell": 53,
    "tambourine": 54,
    "cowbell": 56,
    "shaker": 70,
}

CHORD_INTERVALS: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "sus2": (0, 2, 7),
    "sus4": (0, 5, 7),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "dom7": (0, 4, 7, 10),
    "m7b5": (0, 3, 6, 10),
    "add9": (0, 4, 7, 14),
    "min9": (0, 3, 7, 10, 14),
    "dom9": (0, 4, 7, 10, 14),
}

SCALES: dict[str, tuple[int, ...]] = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}

# Pattern strings are on a 16th-note grid, one character per step (16 per 4/4 bar, 12 per 3/4 bar).
# Drums: X accent, x hit, o ghost, ? ghost hit with probability OPTIONAL_HIT_PROBABILITY, . rest.
# Bass: R root, 3 third, 5 fifth, 7 seventh, O octave, A chromatic approach to the next bar's root,
# - hold, . rest. Chords and melody: x strike, - hold, . rest.
OPTIONAL_HIT_PROBABILITY = 0.3
DRUM_ACCENTS = {"X": 1.0, "x": 0.82, "o": 0.5, "?": 0.5}


@dataclass(frozen=True)
class StyleSpec:
    """How a style plays: tempo range, metre, swing and the pattern tables its parts draw from.

    ``swing`` is where the off-beat of each ``swing_unit`` (in beats: 0.5 for 8ths, 0.25 for 16ths)
    falls, as a fraction of the unit (0.5 = straight, 2/3 = triplet swing). Pattern tables map an
    energy (``low``/``high``) to the choices for one bar.
    """

    name: str
    tempo_range: tuple[float, float]
    beats_per_bar: int
    swing: float
    swing_unit: float
    drums: dict[str, dict[str, str]]
    bass: dict[str, tuple[str, ...]]
    bass_gate: float
    comping: dict[str, tuple[str, ...]]
    comping_gate: float
    melody_cells: tuple[str, ...]
    progressions: dict[str, tuple[tuple[tuple[int, str], ...], ...]]
    fill_triplets: bool = False

    @property
    def steps_per_bar(self) -> int:
        return 4 * self.beats_per_bar


def _progressions(major: list[str], minor: list[str]) -> dict[str, tuple[tuple[tuple[int, str], ...], ...]]:
    """Parse progressions written as ``"0:maj 7:maj 9:min 5:maj"`` (semitones above the tonic : quality)."""

    def parse(text: str) -> tuple[tuple[int, str], ...]:
        chords = []
        for token in text.split():
            offset, quality = token.split(":")
            if quality not in CHORD_INTERVALS:
                raise ValueError(f"unknown chord quality {quality!r} in progression {text!r}")
            chords.append((int(offset), quality))
        return tuple(chords)

    return {"major": tuple(parse(text) for text in major), "minor": tuple(parse(text) for text in minor)}


STYLES: dict[str, StyleSpec] = {
    "rock": StyleSpec(
        name="rock",
        tempo_range=(100.0, 150.0),
        beats_per_bar=4,
        swing=0.5,
        swing_unit=0.5,
        drums={
            "low": {"kick": "x.......x.......", "snare": "....x.......x...", "hat": "x.x.x.x.x.x.x.x."},
            "high": {"kick": "x.....x.x.?...?.", "snare": "....X..?....X...", "hat": "X.x.X.x.X.x.X.x."},
        },
        bass={
            "low": ("R-------R-------", "R-------R---5---"),
            "high": ("R.R.R.R.R.R.R.R.", "R.R.R.R.R.R.5.O.", "R-R-R-R-R-R-R-A-"),
        },
        bass_gate=0.85,
        comping={"low": ("x-------x-------", "x---------------"), "high": ("x.x.x.x.x.x.x.x.", "x--x--x-x--x--x-")},
        comping_gate=0.9,
        melody_cells=("x-x-x-x-x---x-x-", "x---x-x-x-------", "x-x-x---x-x-x---", "..x-x-x-x---x---"),
        progressions=_progressions(
            ["0:maj 7:maj 9:min 5:maj", "0:maj 5:maj 7:maj 5:maj", "0:maj 10:maj 5:maj 0:maj", "9:min 5:maj 0:maj 7:maj"],
            ["0:min 8:maj 3:maj 10:maj", "0:min 10:maj 8:maj 10:maj", "0:min 5:min 8:maj 7:maj"],
        ),
    ),
    "funk": StyleSpec(
        name="funk",
        tempo_range=(92.0, 118.0),
        beats_per_bar=4,
        swing=0.5,
        swing_unit=0.25,
        drums={
            "low": {"kick": "x.........x.....", "snare": "....x..o....x..o", "hat": "x.x.x.x.x.x.x.x."},
            "high": {"kick": "x..x..x...x..?..", "snare": "....X..o.o..X..o", "hat": "xoxoxoxoxoxoxoxo"},
        },
        bass={
            "low": ("R-....R.R.....5.", "R-..O...R..5..7."),
            "high": ("R..O..R.R.5.7.O.", "R.OR..R.7.R..5R.", "R..R.OR..7..R.5A"),
        },
        bass_gate=0.5,
        comping={
            "low": (".x..x......x....", "....x.......x..."),
            "high": ("..x..x.x...x.x..", ".x..x..x.x..x...", "x..x..x..x..x.x."),
        },
        comping_gate=0.35,
        melody_cells=("..x.x..x.x..x...", "x..x..x.x.x.....", "x.x..x.x..x.x...", ".x.x.x..x...x.x."),
        progressions=_progressions(
            ["0:dom9 0:dom9 5:dom9 5:dom9", "0:dom7 5:dom9 0:dom7 7:dom9", "0:dom9 10:dom9 0:dom9 10:dom9"],
            ["0:min7 5:dom9 0:min7 5:dom9", "0:min9 0:min9 10:dom9 8:maj7", "0:min7 3:maj7 5:min7 7:min7"],
        ),
    ),
    "jazz": StyleSpec(
        name="jazz",
        tempo_range=(100.0, 180.0),
        beats_per_bar=4,
        swing=2.0 / 3.0,
        swing_unit=0.5,
        drums={
            "low": {"ride": "x...x.o.x...x.o.", "pedal": "....x.......x...", "kick": "o.......o.......", "snare": "..........?....."},
            "high": {"ride": "X...x.x.X...x.x.", "pedal": "....x.......x...", "kick": "o...o...o...o...", "snare": "......?...?..?.?"},
        },
        bass={
            "low": ("R-------5-------", "R-------3---5---"),
            "high": ("R---3---5---A---", "R---5---O---A---", "R---3---5---7---"),
        },
        bass_gate=0.9,
        comping={
            "low": ("x-----x-........", "x-------........"),
            "high": ("x-----x-........", "...x-.....x-....", "x-....x-....x-.."),
        },
        comping_gate=0.75,
        melody_cells=("x-x-x-x-x-x-x-x-", "..x-x-x-x---x-x-", "x---x-x-x-x-....", "x-x-x-x-x-------"),
        progressions=_progressions(
            ["2:min7 7:dom7 0:maj7 9:dom7", "0:maj7 9:min7 2:min7 7:dom7", "4:min7 9:dom7 2:min7 7:dom7", "0:maj7 5:dom7 4:min7 9:dom7"],
            ["2:m7b5 7:dom7 0:min7 0:min7", "0:min7 5:min7 2:m7b5 7:dom7", "0:min7 8:maj7 2:m7b5 7:dom7"],
        ),
        fill_triplets=True,
    ),
    "electronic": StyleSpec(
        name="electronic",
        tempo_range=(118.0, 135.0),
        beats_per_bar=4,
        swing=0.5,
        swing_unit=0.25,
        drums={
            "low": {"kick": "x...x...x...x...", "clap": "....x.......x...", "hat": "..x...x...x...x."},
            "high": {"kick": "X...X...X...X...", "clap": "....x.......x...", "hat": "xo.oxo.oxo.oxo.o", "open": "..x...x...x...x."},
        },
        bass={"low": ("..R-..R-..R-..R-", "R-------R-------"), "high": ("..R...R...R...R.", "RRO.RRO.RRO.RRO.")},
        bass_gate=0.6,
        comping={"low": ("x---------------", "x-------x-------"), "high": ("..x...x...x...x.", "x..x..x...x..x..")},
        comping_gate=0.5,
        melody_cells=("x-x-x-x-x-x-x-x-", "x.x.x.x.x.x.x.x.", "x--x--x-x--x--x-", "x-------x-x-x---"),
        progressions=_progressions(
            ["0:add9 7:sus2 9:min7 5:add9", "5:maj7 7:sus4 0:add9 9:min7"],
            ["0:min9 8:maj7 3:add9 10:sus2", "0:min7 0:min7 8:maj7 10:dom7", "0:min 3:maj 10:maj 8:maj"],
        ),
    ),
    "hiphop": StyleSpec(
        name="hiphop",
        tempo_range=(78.0, 98.0),
        beats_per_bar=4,
        swing=0.6,
        swing_unit=0.25,
        drums={
            "low": {"kick": "x.........x.....", "snare": "....x.......x...", "hat": "x.x.x.x.x.x.x.x."},
            "high": {"kick": "x.....x...x..x..", "snare": "....X.......X..?", "hat": "x.xox.x.x.xox.x."},
        },
        bass={"low": ("R---------------", "R---------R-----"), "high": ("R-----R-------5-", "R--------R-R--O-")},
        bass_gate=0.95,
        comping={"low": ("x---------------", "x-------x-------"), "high": ("x-----x---------", "x---------x-----")},
        comping_gate=0.95,
        melody_cells=("x-----x-x-------", "....x-x-x---x---", "x---x-x---------", "..x-x---..x-x---"),
        progressions=_progressions(
            ["0:maj7 9:min7 2:min7 7:dom9", "5:maj7 4:min7 2:min7 0:maj7"],
            ["0:min9 8:maj7 0:min9 8:maj7", "0:min7 5:min7 10:dom7 3:maj7", "0:min7 3:maj7 8:maj7 7:min7"],
        ),
    ),
    "reggae": StyleSpec(
        name="reggae",
        tempo_range=(66.0, 90.0),
        beats_per_bar=4,
        swing=0.58,
        swing_unit=0.5,
        drums={
            "low": {"kick": "........x.......", "rim": "........x.......", "hat": "x.x.x.x.x.x.x.x."},
            "high": {"kick": "x...x...x...x...", "snare": "........X.......", "rim": "....x.......x..?", "hat": "x.xox.x.x.xox.x."},
        },
        bass={"low": ("..R-5-R-....R-3-", "....R-R-..5-3-R-"), "high": ("R-R-5-R-..R-5-O-", "R-..R-5-R-..5-R-")},
        bass_gate=0.8,
        comping={"low": ("....x.......x...",), "high": ("..x...x...x...x.", "....x.x.....x.x.")},
        comping_gate=0.3,
        melody_cells=("x-x-x---x-x-x---", "..x-x-x-x-------", "x---x---x-x-x---", "....x-x-x-x-x---"),
        progressions=_progressions(
            ["0:maj 5:maj 7:maj 5:maj", "0:maj 7:maj 9:min 5:maj", "0:maj 0:maj 5:maj 7:maj"],
            ["0:min 5:min 0:min 5:min", "0:min 10:maj 0:min 10:maj", "0:min 8:maj 10:maj 0:min"],
        ),
    ),
    "bossa_nova": StyleSpec(
        name="bossa_nova",
        tempo_range=(110.0, 145.0),
        beats_per_bar=4,
        swing=0.5,
        swing_unit=0.5,
        drums={
            "low": {"kick": "x..ox..ox..ox..o", "rim": "x..x..x...x..x..", "shaker": "x.o.x.o.x.o.x.o."},
            "high": {"kick": "x..xx..xx..xx..x", "rim": "x..x..x...x..x..", "hat": "x.x.x.x.x.x.x.x.", "shaker": "xoxoxoxoxoxoxoxo"},
        },
        bass={"low": ("R-----5-R-----5-",), "high": ("R-----5-R-----5-", "R--5--5-R--5--5-")},
        bass_gate=0.9,
        comping={"low": ("x--x--x...x--x..", "x-----x-..x-----"), "high": ("x..x..x...x..x..", ".x.x..x..x.x..x.")},
        comping_gate=0.6,
        melody_cells=("x--x--x-x-x-x---", "x---x--x--x-x---", "..x-x-x-x--x----", "x-x-x--x--x-----"),
        progressions=_progressions(
            ["0:maj7 2:dom7 2:min7 7:dom7", "0:maj7 9:min7 2:min7 7:dom9", "5:maj7 10:dom9 0:maj7 0:maj7"],
            ["0:min7 5:min7 7:dom7 0:min7", "0:min7 2:m7b5 7:dom7 0:min7", "0:min9 10:dom9 8:maj7 7:dom7"],
        ),
    ),
    "waltz": StyleSpec(
        name="waltz",
        tempo_range=(84.0, 160.0),
        beats_per_bar=3,
        swing=0.5,
        swing_unit=0.5,
        drums={
            "low": {"kick": "x...........", "snare": "....o...o...", "hat": "x...x...x..."},
            "high": {"kick": "x.......?...", "snare": "....x...x...", "hat": "x.x.x.x.x.x."},
        },
        bass={"low": ("R-----------", "R-------5---"), "high": ("R---5---5---", "R---O---5---")},
        bass_gate=0.7,
        comping={"low": ("....x---x---", "x-----------"), "high": ("....x...x...", "x...x...x...")},
        comping_gate=0.5,
        melody_cells=("x-------x---", "x---x---x---", "x-----x-x-x-", "x-----------"),
        progressions=_progressions(
            ["0:maj 5:maj 7:dom7 0:maj", "0:maj 9:min 2:min 7:dom7", "0:maj 4:min 5:maj 7:maj"],
            ["0:min 5:min 7:dom7 0:min", "0:min 8:maj 5:min 7:maj", "0:min 3:maj 10:maj 7:dom7"],
        ),
        fill_triplets=True,
    ),
}
assert tuple(STYLES) == STYLE_NAMES, "every style in tags.STYLE_NAMES needs a StyleSpec here, in the same order"

PAD_PROBABILITY = 0.4
# Instruments that hold each bar's chord when they play the chords role, instead of the style's comping
# pattern: synth_pad's attack takes about 0.5 s to come within 10 dB of its peak, so short comping stabs
# left it 17 dB below the mix in the median, 20-27 dB in a quarter of its songs (generator version 1):
# its tag was barely audible. Held, it sits 8 dB below the mix in the median, like the other parts.
HELD_CHORD_INSTRUMENTS = frozenset({"synth_pad"})
SECTION_BARS = 4
SECTION_PLAN = ("verse", "chorus", "verse", "chorus", "bridge", "chorus", "verse", "chorus")


@dataclass(frozen=True)
class Note:
    """One note: onset and offset in seconds, MIDI pitch, MIDI velocity."""

    start: float
    end: float
    pitch: int
    velocity: int


@dataclass
class Part:
    """One instrument's notes. ``instrument`` is a catalogue name (or drum kit name for drums)."""

    role: str
    instrument: str
    program: int
    is_drum: bool
    notes: list[Note] = field(default_factory=list)


@dataclass(frozen=True)
class SongFactors:
    """The hidden generator factors of one song; the tags are a function of these alone."""

    style: str
    key: int
    mode: str
    energy: str
    tempo_bpm: float
    bass: str
    chords: str
    melody: str
    pad: str | None
    drum_kit: str

    @property
    def instruments(self) -> tuple[str, ...]:
        """The pitched instruments that play, in role order (bass, chords, melody, pad)."""
        return tuple(name for name in (self.bass, self.chords, self.melody, self.pad) if name is not None)

    @property
    def key_name(self) -> str:
        return KEY_NAMES[self.key]

    @property
    def tags(self) -> tuple[str, ...]:
        return song_tags(self.style, self.instruments, self.drum_kit, self.mode, self.energy, self.tempo_bpm)


@dataclass
class Song:
    """A composed song: its factors, its parts and the section names of its 4-bar blocks."""

    factors: SongFactors
    parts: list[Part]
    seconds: float
    sections: list[str]

    def to_midi(self) -> pretty_midi.PrettyMIDI:
        """The song as a General MIDI file (tempo, metre and key signature included)."""
        style = STYLES[self.factors.style]
        midi = pretty_midi.PrettyMIDI(initial_tempo=self.factors.tempo_bpm)
        midi.time_signature_changes.append(pretty_midi.TimeSignature(style.beats_per_bar, 4, 0.0))
        key_number = self.factors.key + (12 if self.factors.mode == "minor" else 0)
        midi.key_signature_changes.append(pretty_midi.KeySignature(key_number, 0.0))
        for part in self.parts:
            track = pretty_midi.Instrument(program=part.program, is_drum=part.is_drum, name=f"{part.role}:{part.instrument}")
            track.notes = [pretty_midi.Note(note.velocity, note.pitch, note.start, note.end) for note in part.notes]
            midi.instruments.append(track)
        return midi

    def midi_bytes(self) -> bytes:
        """The song as Standard MIDI File bytes (fast; see :func:`song_midi_bytes`)."""
        return song_midi_bytes(self)


MIDI_TICKS_PER_BEAT = 480
# Key signature of each major key's tonic pitch class, as sharps (+) or flats (-).
_KEY_SIGNATURE_ACCIDENTALS = {0: 0, 7: 1, 2: 2, 9: 3, 4: 4, 11: 5, 6: 6, 1: -5, 8: -4, 3: -3, 10: -2, 5: -1}


def _variable_length(value: int) -> bytes:
    """A MIDI variable-length quantity: 7 bits per byte, high bit set on all but the last."""
    groups = [value & 0x7F]
    value >>= 7
    while value:
        groups.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(groups))


def _midi_track(events: list[tuple[int, int, bytes]]) -> bytes:
    """An ``MTrk`` chunk from (tick, order, message) events; ``order`` breaks ties (note-offs first)."""
    body = bytearray()
    tick = 0
    for event_tick, _, message in sorted(events, key=lambda event: (event[0], event[1])):
        body += _variable_length(event_tick - tick) + message
        tick = event_tick
    body += b"\x00\xff\x2f\x00"  # end of track
    return b"MTrk" + len(body).to_bytes(4, "big") + bytes(body)


def song_midi_bytes(song: Song) -> bytes:
    """The song as a Standard MIDI File (format 1), written directly.

    Same content as :meth:`Song.to_midi` (tempo, metre, key signature, one track per part, GM
    programs, drums on channel 10) at 480 ticks per beat, but ~10x faster than going through
    pretty_midi and mido, which matters when writing hundreds of files.
    """
    factors = song.factors
    ticks_per_second = factors.tempo_bpm / 60.0 * MIDI_TICKS_PER_BEAT
    microseconds_per_beat = int(round(60_000_000 / factors.tempo_bpm))
    major_tonic = factors.key if factors.mode == "major" else (factors.key + 3) % 12
    accidentals = _KEY_SIGNATURE_ACCIDENTALS[major_tonic]
    conductor = [
        (0, 0, b"\xff\x51\x03" + microseconds_per_beat.to_bytes(3, "big")),
        (0, 1, bytes([0xFF, 0x58, 0x04, STYLES[factors.style].beats_per_bar, 2, 24, 8])),
        (0, 2, bytes([0xFF, 0x59, 0x02, accidentals & 0xFF, 1 if factors.mode == "minor" else 0])),
    ]
    chunks = [_midi_track(conductor)]
    melodic_channels = iter(channel for channel in range(16) if channel != 9)
    for part in song.parts:
        channel = 9 if part.is_drum else next(melodic_channels)
        name = f"{part.role}:{part.instrument}".encode()
        events: list[tuple[int, int, bytes]] = [
            (0, 0, b"\xff\x03" + _variable_length(len(name)) + name),
            (0, 1, bytes([0xC0 | channel, part.program])),
        ]
        for note in part.notes:
            start = int(round(note.start * ticks_per_second))
            end = max(start + 1, int(round(note.end * ticks_per_second)))
            events.append((start, 3, bytes([0x90 | channel, note.pitch, note.velocity])))
            events.append((end, 2, bytes([0x80 | channel, note.pitch, 0])))
        chunks.append(_midi_track(events))
    header = b"MThd" + (6).to_bytes(4, "big") + (1).to_bytes(2, "big") + len(chunks).to_bytes(2, "big")
    header += MIDI_TICKS_PER_BEAT.to_bytes(2, "big")
    return header + b"".join(chunks)


def draw_factors(rng: np.random.Generator) -> SongFactors:
    """Draw a song's generator factors.

    Style, mode and energy are uniform and independent; the tempo is uniform in the style's range;
    the key is uniform; each role's instrument is uniform over the instruments that can play it
    (no instrument twice), independently of the style; the pad plays in :data:`PAD_PROBABILITY` of
    the songs; the drum kit is uniform, independently of the style.
    """
    style = STYLE_NAMES[int(rng.integers(len(STYLE_NAMES)))]
    low, high = STYLES[style].tempo_range
    tempo_bpm = round(float(rng.uniform(low, high)), 1)
    mode = ("major", "minor")[int(rng.integers(2))]
    energy = ("low", "high")[int(rng.integers(2))]
    key = int(rng.integers(12))
    chosen: list[str] = []
    for role in ("bass", "chords", "melody"):
        candidates = [spec.name for spec in INSTRUMENTS if role in spec.roles and spec.name not in chosen]
        chosen.append(candidates[int(rng.integers(len(candidates)))])
    pad = None
    if rng.random() < PAD_PROBABILITY:
        candidates = [spec.name for spec in INSTRUMENTS if "pad" in spec.roles and spec.name not in chosen]
        pad = candidates[int(rng.integers(len(candidates)))]
    drum_kit = DRUM_KITS[int(rng.integers(len(DRUM_KITS)))].name
    return SongFactors(style, key, mode, energy, tempo_bpm, chosen[0], chosen[1], chosen[2], pad, drum_kit)


def _clamp(value, low, high):
    """``value`` limited to ``[low, high]`` (np.clip is ~10x slower on Python scalars)."""
    return low if value < low else high if value > high else value


@dataclass(frozen=True)
class _Bar:
    index: int
    section: str
    section_number: int  # how many sections of this kind came before
    bar_in_section: int
    chord: tuple[int, str]  # (root pitch class, quality)
    next_chord: tuple[int, str]
    last_of_section: bool


class _Clock:
    """Maps positions in beats to seconds, applying the style's swing."""

    def __init__(self, tempo_bpm: float, swing: float, swing_unit: float) -> None:
        self.seconds_per_beat = 60.0 / tempo_bpm
        self.swing = swing
        self.swing_unit = swing_unit

    def seconds(self, beat: float) -> float:
        unit_index = math.floor(beat / self.swing_unit + 1e-9)
        fraction = beat / self.swing_unit - unit_index
        if fraction < 0.5:
            warped = fraction / 0.5 * self.swing
        else:
            warped = self.swing + (fraction - 0.5) / 0.5 * (1.0 - self.swing)
        return (unit_index + warped) * self.swing_unit * self.seconds_per_beat


class _Composer:
    """Writes the parts of one song; holds the song's generator and settings while composing."""

    def __init__(self, factors: SongFactors, seconds: float, rng: np.random.Generator) -> None:
        self.factors = factors
        self.style = STYLES[factors.style]
        self.seconds = seconds
        self.rng = rng
        self.clock = _Clock(factors.tempo_bpm, self.style.swing, self.style.swing_unit)
        self.high = factors.energy == "high"
        self.steps = self.style.steps_per_bar
        self.bar_beats = self.style.beats_per_bar
        self.bars = self._plan_bars()
        self.chorus_on_ride: dict[tuple[str, int], bool] = {}

    # -- structure -------------------------------------------------------------------------------

    def _plan_bars(self) -> list[_Bar]:
        bar_seconds = self.bar_beats * self.clock.seconds_per_beat
        bar_count = math.ceil(self.seconds / bar_seconds) + 1
        section_count = math.ceil(bar_count / SECTION_BARS)
        start = int(self.rng.integers(2))  # songs start on a verse or on a chorus
        plan = [SECTION_PLAN[(start + number) % len(SECTION_PLAN)] for number in range(section_count)]
        # Each section kind gets its own progression (different ones where the style has enough).
        options = self.style.progressions[self.factors.mode]
        order = self.rng.permutation(len(options))
        progression = {kind: options[order[position % len(options)]] for position, kind in enumerate(("verse", "chorus", "bridge"))}
        bars: list[_Bar] = []
        seen: dict[str, int] = {}
        chords: list[tuple[int, str]] = []
        for kind in plan:
            for offset, quality in progression[kind]:
                chords.append(((self.factors.key + offset) % 12, quality))
        chords.append(chords[0])
        for number, kind in enumerate(plan):
            for bar_in_section in range(SECTION_BARS):
                index = number * SECTION_BARS + bar_in_section
                bars.append(
                    _Bar(index, kind, seen.get(kind, 0), bar_in_section, chords[index], chords[index + 1], bar_in_section == SECTION_BARS - 1)
                )
            seen[kind] = seen.get(kind, 0) + 1
        return bars[:bar_count]

    # -- helpers ---------------------------------------------------------------------------------

    def _time(self, bar: int, step: float) -> float:
        return self.clock.seconds(bar * self.bar_beats + step * 0.25)

    def _velocity(self, base: float, scale: float = 1.0, jitter: float = 6.0) -> int:
        return _clamp(round(base * scale + self.rng.normal(0.0, jitter)), 1, 127)

    def _note(self, bar: int, start_step: float, end_step: float, gate: float, pitch: int, velocity: int, timing_sd: float) -> Note | None:
        start = self._time(bar, start_step)
        span = self._time(bar, end_step) - start
        start = max(0.0, start + float(self.rng.normal(0.0, timing_sd)))
        duration = _clamp(span * gate, NOTE_MIN_SECONDS, NOTE_MAX_SECONDS)
        if start >= self.seconds:
            return None
        return Note(round(start, 5), round(start + duration, 5), int(pitch), velocity)

    def _drum_hit(self, bar: int, step: float, voice: str, velocity: int) -> Note | None:
        start = max(0.0, self._time(bar, step) + float(self.rng.normal(0.0, 0.003)))
        if start >= self.seconds:
            return None
        return Note(round(start, 5), round(start + DRUM_NOTE_SECONDS, 5), DRUM_NOTES[voice], velocity)

    @staticmethod
    def _events(pattern: str) -> list[tuple[int, int, str]]:
        """(step, length in steps, symbol) of each onset: an onset lasts through its ``-`` holds."""
        events = []
        for step, symbol in enumerate(pattern):
            if symbol in ".-":
                continue
            length = 1
            while step + length < len(pattern) and pattern[step + length] == "-":
                length += 1
            events.append((step, length, symbol))
        return events

    def _pick(self, choices: tuple[str, ...] | list[str]) -> str:
        return choices[int(self.rng.integers(len(choices)))]

    # -- drums -----------------------------------------------------------------------------------

    def _drum_bar_pattern(self, bar: _Bar) -> dict[str, str]:
        pattern = dict(self.style.drums["high" if self.high else "low"])
        cymbal = "hat" if "hat" in pattern else ("ride" if "ride" in pattern else None)
        if bar.section == "chorus" and cymbal == "hat":
            # Decided once per section: a chorus moves to the ride, or opens the hi-hat.
            section = (bar.section, bar.section_number)
            if section not in self.chorus_on_ride:
                self.chorus_on_ride[section] = self.rng.random() < 0.5 and self.factors.style != "electronic"
            if self.chorus_on_ride[section]:
                pattern["ride"] = pattern.pop("hat")
            else:
                opens = list(pattern.get("open", "." * self.steps))
                opens[self.steps - 2] = "x"
                pattern["open"] = "".join(opens)
        if bar.section == "verse" and not self.high and "snare" in pattern and "rim" not in pattern:
            pattern["rim"] = pattern.pop("snare")  # quiet verses: side stick instead of snare
        if bar.section == "chorus" and self.high and "tambourine" not in pattern:
            pattern["tambourine"] = "".join("x" if step % 8 == 4 else "." for step in range(self.steps))
        if bar.section == "bridge" and cymbal is not None:
            beats = "".join("x" if step % 4 == 0 else "." for step in range(self.steps))
            pattern.pop(cymbal)
            pattern["bell" if self.high else "ride"] = beats
            pattern["tambourine"] = "".join("x" if step % 8 == 4 else "." for step in range(self.steps))
        return pattern

    def _fill(self, bar: int, beats: int, base: float) -> list[Note]:
        """A fill over the last ``beats`` beats of ``bar``: snare roll, tom run or a mix."""
        kind = self._pick(("snare", "toms", "mixed"))
        subdivision = 3 if self.style.fill_triplets else 4
        count = beats * subdivision
        first_step = self.steps - beats * 4
        toms = ("tom_high", "tom_mid", "tom_low", "tom_floor")
        notes = []
        for position in range(count):
            step = first_step + position * 4.0 / subdivision
            if kind == "snare":
                voice = "snare"
            elif kind == "toms":
                voice = toms[min(3, position * 4 // count)]
            else:
                voice = "snare" if position < count // 2 else toms[min(3, (position - count // 2) * 4 // max(1, count - count // 2))]
            crescendo = 0.55 + 0.45 * position / max(1, count - 1)
            note = self._drum_hit(bar, step, voice, self._velocity(base, crescendo))
            if note is not None:
                notes.append(note)
        return notes

    def drums(self) -> Part:
        kit = drum_kit_by_name(self.factors.drum_kit)
        # Energy shows most in the drums: played hard and up front, or soft and behind the band.
        base = 108.0 if self.high else 66.0
        notes: list[Note] = []
        for bar in self.bars:
            pattern = self._drum_bar_pattern(bar)
            fill_beats = 0
            if bar.last_of_section and bar.index < len(self.bars) - 1:
                fill_beats = 2 if self.high else 1
            fill_start = self.steps - fill_beats * 4
            for voice, row in pattern.items():
                for step, symbol in enumerate(row):
                    if symbol == ".":
                        continue
                    if step >= fill_start and voice != "kick":
                        continue  # the fill replaces everything but the kick
                    if symbol == "?" and self.rng.random() >= OPTIONAL_HIT_PROBABILITY:
                        continue
                    if symbol in "xo" and voice in ("hat", "ride", "shaker") and self.rng.random() < 0.04:
                        continue  # an occasional dropped cymbal stroke: no two bars identical
                    note = self._drum_hit(bar.index, step, voice, self._velocity(base, DRUM_ACCENTS[symbol]))
                    if note is not None:
                        notes.append(note)
            if bar.bar_in_section == 0 and (bar.section == "chorus" or self.high or bar.index == 0):
                note = self._drum_hit(bar.index, 0, "crash", self._velocity(base, 0.9))
                if note is not None:
                    notes.append(note)
            if fill_beats:
                notes.extend(self._fill(bar.index, fill_beats, base))
        notes.sort(key=lambda note: (note.start, note.pitch))
        return Part("drums", kit.name, kit.program, True, notes)

    # -- bass ------------------------------------------------------------------------------------

    def _bass_pitch(self, symbol: str, chord: tuple[int, str], next_chord: tuple[int, str]) -> int:
        low, high = ROLE_PITCH_RANGES["bass"]
        root = 31 + (chord[0] - 31) % 12  # G1..F#2: the root sits low, octaves and fifths above it
        intervals = CHORD_INTERVALS[chord[1]]
        if symbol == "R":
            pitch = root
        elif symbol == "3":
            pitch = root + intervals[1]
        elif symbol == "5":
            pitch = root + intervals[2]
        elif symbol == "7":
            sevenths = [interval for interval in intervals if interval in (10, 11)]
            pitch = root + (sevenths[0] if sevenths else 12)
        elif symbol == "O":
            pitch = root + 12
        elif symbol == "A":
            target = 31 + (next_chord[0] - 31) % 12
            pitch = target + (1 if self.rng.random() < 0.5 else -1)
        else:
            raise ValueError(f"unknown bass symbol {symbol!r}")
        return _clamp(pitch, low, high)

    def bass(self) -> Part:
        spec = instrument_by_name(self.factors.bass)
        base = 100.0 if self.high else 86.0
        choices = self.style.bass["high" if self.high else "low"]
        section_patterns: dict[tuple[str, int], str] = {}
        notes = []
        for bar in self.bars:
            key = (bar.section, bar.bar_in_section % 2)
            if key not in section_patterns:
                section_patterns[key] = self._pick(choices)
            pattern = section_patterns[key]
            if bar.last_of_section and self.rng.random() < 0.5:
                pattern = self._pick(choices)  # turnaround: the bar before a new section varies
            for step, length, symbol in self._events(pattern):
                pitch = self._bass_pitch(symbol, bar.chord, bar.next_chord)
                accent = 1.0 if step % 4 == 0 else 0.88
                note = self._note(bar.index, step, step + length, self.style.bass_gate, pitch, self._velocity(base, accent), 0.005)
                if note is not None:
                    notes.append(note)
        return Part("bass", spec.name, spec.program, False, notes)

    # -- chords and pad --------------------------------------------------------------------------

    @staticmethod
    def _voicing(chord: tuple[int, str], centre: int, role: str) -> list[int]:
        """Close voicing of the chord's pitch classes around ``centre``, inside the role's range."""
        low, high = ROLE_PITCH_RANGES[role]
        pitches = []
        for interval in CHORD_INTERVALS[chord[1]]:
            pitch_class = (chord[0] + interval) % 12
            pitch = centre - 5 + (pitch_class - (centre - 5)) % 12
            while pitch > high:
                pitch -= 12
            while pitch < low:
                pitch += 12
            pitches.append(pitch)
        return sorted(set(pitches))

    def chords(self) -> Part:
        spec = instrument_by_name(self.factors.chords)
        base = 88.0 if self.high else 72.0
        centre = int(self.rng.integers(60, 68)) if self.high else int(self.rng.integers(56, 64))
        if spec.name in HELD_CHORD_INSTRUMENTS:
            notes = self._held_chords(base, lambda bar: self._voicing(bar.chord, centre + (2 if bar.section == "chorus" else 0), "chords"))
            return Part("chords", spec.name, spec.program, False, notes)
        strum = 0.012 if "guitar" in spec.name else 0.0  # guitars strum: strings sound one after another
        choices = self.style.comping["high" if self.high else "low"]
        section_patterns: dict[tuple[str, int], str] = {}
        notes = []
        for bar in self.bars:
            key = (bar.section, bar.section_number % 2)
            if key not in section_patterns:
                section_patterns[key] = self._pick(choices)
            pattern = section_patterns[key]
            if self.rng.random() < 0.25:
                pattern = self._pick(choices)
            voicing = self._voicing(bar.chord, centre + (2 if bar.section == "chorus" else 0), "chords")
            for step, length, _ in self._events(pattern):
                velocity = self._velocity(base, 1.0 if step % 4 == 0 else 0.9)
                upstroke = strum and step % 2 == 1
                order = voicing[::-1] if upstroke else voicing
                for position, pitch in enumerate(order):
                    note = self._note(bar.index, step, step + length, self.style.comping_gate, pitch, velocity, 0.004)
                    if note is not None:
                        shift = position * strum
                        notes.append(Note(note.start + shift, max(note.end, note.start + shift + NOTE_MIN_SECONDS), pitch, note.velocity))
        notes.sort(key=lambda note: (note.start, note.pitch))
        return Part("chords", spec.name, spec.program, False, notes)

    def pad(self) -> Part | None:
        if self.factors.pad is None:
            return None
        spec = instrument_by_name(self.factors.pad)
        base = 70.0 if self.high else 62.0
        centre = int(self.rng.integers(55, 62))
        return Part("pad", spec.name, spec.program, False, self._held_chords(base, lambda bar: self._voicing(bar.chord, centre, "pad")))

    def _held_chords(self, base: float, voicing_of) -> list[Note]:
        """Held chords: one per bar, or two when a bar outlasts the bank's longest note; ``voicing_of``
        gives a bar's pitches."""
        strikes = 1 if self.bar_beats * self.clock.seconds_per_beat <= NOTE_MAX_SECONDS else 2
        notes = []
        for bar in self.bars:
            voicing = voicing_of(bar)
            for strike in range(strikes):
                first = strike * self.steps / strikes
                velocity = self._velocity(base, 1.0 if strike == 0 else 0.85)
                for pitch in voicing:
                    note = self._note(bar.index, first, first + self.steps / strikes, 0.97, pitch, velocity, 0.004)
                    if note is not None:
                        notes.append(note)
        notes.sort(key=lambda note: (note.start, note.pitch))
        return notes

    # -- melody ----------------------------------------------------------------------------------

    def _motif(self) -> dict:
        """A two-bar motif: a rhythm cell per bar and a contour of scale steps."""
        cells = [self._pick(self.style.melody_cells) for _ in range(2)]
        if not self.high:
            cells = [self._sparser(cell) for cell in cells]
        onsets = sum(len(self._events(cell)) for cell in cells)
        contour = [int(step) for step in self.rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3], size=onsets)]
        return {"cells": cells, "contour": contour}

    def _sparser(self, cell: str) -> str:
        """Low energy: merge some onsets into the note before them (fewer, longer notes)."""
        symbols = list(cell)
        onsets = [step for step, symbol in enumerate(symbols) if symbol == "x"]
        for step in onsets[1:]:
            if self.rng.random() < 0.35:
                symbols[step] = "-" if symbols[step - 1] != "." else "."
        return "".join(symbols)

    def _mutated(self, motif: dict) -> dict:
        """A variation: some contour steps changed, maybe a new rhythm for the second bar."""
        cells = list(motif["cells"])
        contour = list(motif["contour"])
        if self.rng.random() < 0.5:
            cells[1] = self._pick(self.style.melody_cells)
            if not self.high:
                cells[1] = self._sparser(cells[1])
        onsets = sum(len(self._events(cell)) for cell in cells)
        contour = (contour + [int(step) for step in self.rng.choice([-1, 1], size=onsets)])[:onsets]
        for position in range(onsets):
            if self.rng.random() < 0.35:
                contour[position] = int(self.rng.choice([-2, -1, 1, 2]))
        return {"cells": cells, "contour": contour}

    def melody(self) -> Part:
        spec = instrument_by_name(self.factors.melody)
        low, high = ROLE_PITCH_RANGES["melody"]
        base = 100.0 if self.high else 86.0
        scale = SCALES[self.factors.mode]
        scale_pitches = [pitch for pitch in range(low, high + 1) if (pitch - self.factors.key) % 12 in scale]
        home = int(self.rng.integers(66, 73)) if self.high else int(self.rng.integers(62, 69))
        motifs: dict[str, dict] = {}
        notes = []
        pitch = home
        for bar in self.bars:
            if bar.bar_in_section % 2 == 0:
                if bar.section not in motifs:
                    motifs[bar.section] = self._motif()
                    phrase = motifs[bar.section]
                else:
                    phrase = self._mutated(motifs[bar.section])
                if bar.bar_in_section == 2:
                    phrase = self._mutated(phrase)  # the answer phrase varies the question
                register = home + {"verse": 0, "chorus": 4, "bridge": -2}[bar.section]
                contour_position = 0
                pitch = min(scale_pitches, key=lambda candidate: abs(candidate - register))
            cell = phrase["cells"][bar.bar_in_section % 2]
            events = self._events(cell)
            chord_classes = {(bar.chord[0] + interval) % 12 for interval in CHORD_INTERVALS[bar.chord[1]]}
            chord_tones = [candidate for candidate in range(low, high + 1) if candidate % 12 in chord_classes]
            for number, (step, length, _) in enumerate(events):
                move = phrase["contour"][min(contour_position, len(phrase["contour"]) - 1)]
                contour_position += 1
                position = scale_pitches.index(min(scale_pitches, key=lambda candidate: abs(candidate - pitch)))
                # Drift back towards the register so that long random walks stay singable.
                if pitch > register + 7:
                    move = -abs(move) or -1
                elif pitch < register - 7:
                    move = abs(move) or 1
                target = scale_pitches[_clamp(position + move, 0, len(scale_pitches) - 1)]
                if step % 4 == 0:  # strong beats land on a chord tone
                    target = min(chord_tones, key=lambda candidate: (abs(candidate - target), candidate))
                pitch = _clamp(target, low, high)
                phrase_end = bar.bar_in_section % 2 == 1 and number == len(events) - 1
                end_step = step + length
                if phrase_end and end_step < self.steps:
                    end_step = self.steps  # the last note of a phrase rings to the bar line
                accent = 1.0 if step % 4 == 0 else 0.9
                note = self._note(bar.index, step, end_step, 0.92, pitch, self._velocity(base, accent), 0.007)
                if note is not None:
                    notes.append(note)
        return Part("melody", spec.name, spec.program, False, notes)


def compose_song(factors: SongFactors, seconds: float, rng: np.random.Generator) -> Song:
    """Compose a song with these factors lasting at least ``seconds``; ``rng`` drives every choice."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if factors.style not in STYLES:
        raise ValueError(f"unknown style {factors.style!r}; known: {list(STYLES)}")
    composer = _Composer(factors, seconds, rng)
    parts = [composer.drums(), composer.bass(), composer.chords(), composer.melody()]
    pad = composer.pad()
    if pad is not None:
        parts.append(pad)
    sections = [bar.section for bar in composer.bars if bar.bar_in_section == 0]
    return Song(factors, parts, seconds, sections)
