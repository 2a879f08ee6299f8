"""The corpus's catalogue and tag vocabulary: which styles, instruments and drum kits exist, and
how a song's hidden generator factors map to its tags.

Every tag comes from a factor the generator drew, so the tags are exact. Tags carry a group prefix
in the MTG-Jamendo style (``instrument---piano``) so that :attr:`TrackIndex.tag_groups` reports
metrics per group:

- ``style---*``: the genre-like style (rhythm patterns, swing, chord vocabulary, bass line, tempo range).
- ``instrument---*``: each pitched instrument that plays in the song (drawn independently of style).
- ``drums---*``: the drum kit (drawn independently of style).
- ``mood---*``: mode (major/minor) crossed with energy (high/low).
- ``tempo---fast`` / ``tempo---slow``: tempo at or above :data:`FAST_BPM` / at or below
  :data:`SLOW_BPM`; medium tempi get neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# The same as musicssl.data.index.GROUP_SEPARATOR; not imported from there because importing
# musicssl.data loads torch (~1 s), which the corpus builder and its worker processes do not need.
GROUP_SEPARATOR = "---"

__all__ = [
    "InstrumentSpec",
    "DrumKitSpec",
    "INSTRUMENTS",
    "DRUM_KITS",
    "STYLE_NAMES",
    "ROLES",
    "ROLE_PITCH_RANGES",
    "MOODS",
    "FAST_BPM",
    "SLOW_BPM",
    "TAG_NAMES",
    "instrument_by_name",
    "drum_kit_by_name",
    "mood_name",
    "tempo_tag",
    "song_tags",
]


@dataclass(frozen=True)
class InstrumentSpec:
    """A pitched General MIDI instrument the composer may use.

    ``program`` is the 0-based GM program; ``roles`` are the parts it may play
    (``bass``, ``chords``, ``melody``, ``pad``).
    """

    name: str
    program: int
    family: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class DrumKitSpec:
    """A GM drum kit: the program number selected on the percussion channel."""

    name: str
    program: int


ROLES = ("bass", "chords", "melody", "pad")

# MIDI pitch range of each role, inclusive. The composer clamps every note into its role's range
# and the note bank renders every semitone of the union of an instrument's role ranges.
ROLE_PITCH_RANGES: dict[str, tuple[int, int]] = {
    "bass": (28, 56),
    "chords": (48, 79),
    "pad": (48, 79),
    "melody": (57, 86),
}

# 18 pitched instruments from 13 of the 16 GM families. Several instruments can play more than one
# role, and which one plays what is drawn per song, independently of the style: a probe must hear
# timbre, not infer it from the genre.
INSTRUMENTS: tuple[InstrumentSpec, ...] = (
    InstrumentSpec("piano", 0, "piano", ("chords", "melody")),
    InstrumentSpec("electric_piano", 4, "piano", ("chords", "melody")),
    InstrumentSpec("vibraphone", 11, "chromatic_percussion", ("chords", "melody")),
    InstrumentSpec("organ", 16, "organ", ("chords", "melody", "pad")),
    InstrumentSpec("acoustic_guitar", 25, "guitar", ("chords",)),
    InstrumentSpec("electric_guitar", 27, "guitar", ("chords", "melody")),
    InstrumentSpec("distorted_guitar", 30, "guitar", ("chords", "melody")),
    InstrumentSpec("acoustic_bass", 32, "bass", ("bass",)),
    InstrumentSpec("electric_bass", 33, "bass", ("bass",)),
    InstrumentSpec("synth_bass", 38, "bass", ("bass",)),
    InstrumentSpec("violin", 40, "strings", ("melody",)),
    InstrumentSpec("strings", 48, "ensemble", ("chords", "pad")),
    InstrumentSpec("trumpet", 56, "brass", ("melody",)),
    InstrumentSpec("saxophone", 65, "reed", ("melody",)),
    InstrumentSpec("flute", 73, "pipe", ("melody",)),
    InstrumentSpec("synth_lead", 81, "synth_lead", ("melody",)),
    InstrumentSpec("synth_pad", 89, "synth_pad", ("chords", "pad")),
    InstrumentSpec("sitar", 104, "ethnic", ("melody",)),
)

# The kits of TimGM6mb.sf2 that are not copies of another (its "jazz" kit, program 32, is the standard kit). They
# still share samples: the brush kit plays the standard kit's kick, rim and hi-hats (and its toms and cymbals 6 dB
# louder), differing in snare and clap only; the rock kit shares the standard kit's hi-hats (README, "The
# embedded corpus": where the brush and standard kits sound alike).
DRUM_KITS: tuple[DrumKitSpec, ...] = (
    DrumKitSpec("standard_kit", 0),
    DrumKitSpec("rock_kit", 16),
    DrumKitSpec("electronic_kit", 24),
    DrumKitSpec("808_kit", 25),
    DrumKitSpec("brush_kit", 40),
)

STYLE_NAMES = ("rock", "funk", "jazz", "electronic", "hiphop", "reggae", "bossa_nova", "waltz")

# (mode, energy) -> mood tag name.
MOODS: dict[tuple[str, str], str] = {
    ("major", "high"): "happy",
    ("major", "low"): "relaxed",
    ("minor", "low"): "sad",
    ("minor", "high"): "tense",
}

FAST_BPM = 120.0
SLOW_BPM = 90.0


def _tag(group: str, name: str) -> str:
    return f"{group}{GROUP_SEPARATOR}{name}"


TAG_NAMES: tuple[str, ...] = (
    *(_tag("style", name) for name in STYLE_NAMES),
    *(_tag("instrument", spec.name) for spec in INSTRUMENTS),
    *(_tag("drums", kit.name) for kit in DRUM_KITS),
    *(_tag("mood", name) for name in MOODS.values()),
    _tag("tempo", "fast"),
    _tag("tempo", "slow"),
)


def instrument_by_name(name: str) -> InstrumentSpec:
    """The catalogue entry called ``name``; raises ``KeyError`` naming the known instruments."""
    for spec in INSTRUMENTS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown instrument {name!r}; known: {[spec.name for spec in INSTRUMENTS]}")


def drum_kit_by_name(name: str) -> DrumKitSpec:
    """The drum kit called ``name``; raises ``KeyError`` naming the known kits."""
    for kit in DRUM_KITS:
        if kit.name == name:
            return kit
    raise KeyError(f"unknown drum kit {name!r}; known: {[kit.name for kit in DRUM_KITS]}")


def mood_name(mode: str, energy: str) -> str:
    """The mood for a mode (``major``/``minor``) and an energy (``high``/``low``)."""
    try:
        return MOODS[(mode, energy)]
    except KeyError:
        raise ValueError(f"no mood for mode={mode!r}, energy={energy!r}; modes: major/minor, energies: high/low") from None


def tempo_tag(tempo_bpm: float) -> str | None:
    """``tempo---fast`` at or above :data:`FAST_BPM`, ``tempo---slow`` at or below :data:`SLOW_BPM`, else None."""
    if tempo_bpm >= FAST_BPM:
        return _tag("tempo", "fast")
    if tempo_bpm <= SLOW_BPM:
        return _tag("tempo", "slow")
    return None


def song_tags(
    style: str, instruments: Iterable[str], drum_kit: str, mode: str, energy: str, tempo_bpm: float
) -> tuple[str, ...]:
    """The tags of a song with these generator factors, in vocabulary order."""
    if style not in STYLE_NAMES:
        raise ValueError(f"unknown style {style!r}; known: {list(STYLE_NAMES)}")
    tags = {_tag("style", style), _tag("drums", drum_kit_by_name(drum_kit).name), _tag("mood", mood_name(mode, energy))}
    tags.update(_tag("instrument", instrument_by_name(name).name) for name in instruments)
    tempo = tempo_tag(tempo_bpm)
    if tempo is not None:
        tags.add(tempo)
    return tuple(tag for tag in TAG_NAMES if tag in tags)
