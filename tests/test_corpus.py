"""The embedded corpus: CLI, files, tags against the scores they came from, splits, determinism,
segment variety, and note-bank synthesis against the SoundFont renderer itself."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal as signal_module
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pretty_midi
import pytest
import soundfile
import torch
from scipy import signal, stats

from musicssl.audio import LogMel
from musicssl.corpus import (
    CorpusConfig,
    CorpusError,
    build_corpus,
    ensure_corpus,
    split_assignment,
)
from musicssl.corpus.__main__ import main as cli_main
from musicssl.corpus.build import MIN_SECONDS, corpus_bytes
from musicssl.corpus.compose import STYLES, Note, Part, Song, compose_song, draw_factors
from musicssl.corpus.render import (
    SAMPLE_RATE,
    _shelf,
    draw_mix,
    ensure_note_bank,
    master,
    render_song_directly,
    synthesize,
)
from musicssl.corpus.tags import INSTRUMENTS, TAG_NAMES
from musicssl.data.index import TrackIndex
from conftest import run_main

TRACKS, SECONDS, SEED = 12, 8.0, 3  # 8 s: the shortest a corpus may be (two 4 s views)

# From the General MIDI Level 1 sound set (0-based program numbers), written out independently of
# the corpus's catalogue: program -> the instrument tag it must produce.
GM_PROGRAM_TAGS = {
    0: "piano",  # Acoustic Grand Piano
    4: "electric_piano",  # Electric Piano 1
    11: "vibraphone",  # Vibraphone
    16: "organ",  # Drawbar Organ
    25: "acoustic_guitar",  # Acoustic Guitar (steel)
    27: "electric_guitar",  # Electric Guitar (clean)
    30: "distorted_guitar",  # Distortion Guitar
    32: "acoustic_bass",  # Acoustic Bass
    33: "electric_bass",  # Electric Bass (finger)
    38: "synth_bass",  # Synth Bass 1
    40: "violin",  # Violin
    48: "strings",  # String Ensemble 1
    56: "trumpet",  # Trumpet
    65: "saxophone",  # Alto Sax
    73: "flute",  # Flute
    81: "synth_lead",  # Lead 2 (sawtooth)
    89: "synth_pad",  # Pad 2 (warm)
    104: "sitar",  # Sitar
}
# GS/GM2 drum kit program numbers.
GM_DRUM_KIT_TAGS = {0: "standard_kit", 16: "rock_kit", 24: "electronic_kit", 25: "808_kit", 40: "brush_kit"}
PITCH_CLASS = {"C": 0, "C#": 1, "Db": 1, "D": 2, "D#": 3, "Eb": 3, "E": 4, "F": 5, "F#": 6, "Gb": 6, "G": 7, "G#": 8, "Ab": 8,
               "A": 9, "A#": 10, "Bb": 10, "B": 11}
MOOD_OF = {("major", "high"): "happy", ("major", "low"): "relaxed", ("minor", "low"): "sad", ("minor", "high"): "tense"}


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache folder; the note bank is rendered into it once per test session."""
    return tmp_path_factory.mktemp("musicssl-cache")


@pytest.fixture(scope="session")
def bank(cache: Path):
    return ensure_note_bank(cache, workers=2)


@pytest.fixture(scope="session")
def cli_corpus(tmp_path_factory: pytest.TempPathFactory, cache: Path, bank) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("corpora") / "cli"
    env = {**os.environ, "MUSICSSL_CACHE": str(cache)}
    command = [sys.executable, "-m", "musicssl.corpus", "--tracks", str(TRACKS), "--seconds", str(SECONDS)]
    command += ["--seed", str(SEED), "--workers", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    return out, result


def read_tracks(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "tracks.csv", keep_default_na=False)


def test_cli_builds_a_corpus_and_says_what_it_built(cli_corpus):
    out, result = cli_corpus
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith(f"built {TRACKS} tracks x 8 s")
    assert str(out) in last_line and last_line.endswith(" s")
    # Its progress, in plain lines where the output is not a terminal (here a pipe; a log file alike).
    assert f"\ncorpus: {TRACKS}/{TRACKS} tracks in " in "\n" + result.stderr and "\r" not in result.stderr, result.stderr
    assert (out / "tracks.csv").is_file() and (out / "corpus.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name], "a staging folder was left behind"


def test_tracks_csv_has_the_columns_and_reads_back_as_a_track_index(cli_corpus):
    out, _ = cli_corpus
    frame = read_tracks(out)
    for column in ("track_id", "path", "split", "tags", "duration", "style", "key", "mode", "tempo_bpm", "energy",
                   "instruments", "drum_kit", "gain_db", "reverb"):
        assert column in frame.columns, column
    index = TrackIndex.from_csv(out / "tracks.csv")
    assert len(index) == TRACKS
    assert set(index.tag_groups) <= {"style", "instrument", "drums", "mood", "tempo"}
    assert {"style", "instrument", "drums", "mood"} <= set(index.tag_groups)
    for path in index.paths:
        assert Path(path).is_file()
    for tags in index.tracks["tags"]:
        groups = [tag.split("---")[0] for tag in tags]
        assert groups.count("style") == 1 and groups.count("drums") == 1 and groups.count("mood") == 1
        assert groups.count("tempo") <= 1 and 3 <= groups.count("instrument") <= 4


def test_audio_is_16khz_mono_flac_of_the_stated_length_and_never_silent(cli_corpus):
    out, _ = cli_corpus
    frame = read_tracks(out)
    for _, row in frame.iterrows():
        info = soundfile.info(str(out / row["path"]))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert info.frames == int(SECONDS * 16000) and float(row["duration"]) == SECONDS
        samples, _ = soundfile.read(str(out / row["path"]), dtype="int16")
        # Mastered to a peak of at most 0.99 (before: a check of |x| <= 1 on decoded 16-bit audio, always true)
        assert np.abs(samples.astype(np.int32)).max() <= round(0.99 * 32767) + 1
        audio = samples / 32768.0
        windows = audio.reshape(-1, 16000)  # every second of every track has music in it
        assert (20 * np.log10(np.sqrt((windows**2).mean(axis=1))) > -50.0).all(), row["track_id"]
        # The level written in tracks.csv is the RMS level of the file.
        assert 20 * np.log10(np.sqrt((audio**2).mean())) == pytest.approx(float(row["gain_db"]), abs=0.05)


def test_tags_agree_with_the_midi_score_and_the_generator_factors(cli_corpus):
    out, _ = cli_corpus
    for _, row in read_tracks(out).iterrows():
        tags = set(row["tags"].split(";"))
        midi = pretty_midi.PrettyMIDI(str(out / row["midi"]))
        pitched = [track for track in midi.instruments if not track.is_drum]
        drums = [track for track in midi.instruments if track.is_drum]
        assert all(track.notes for track in midi.instruments)
        assert {tag for tag in tags if tag.startswith("instrument---")} == {f"instrument---{GM_PROGRAM_TAGS[t.program]}" for t in pitched}
        assert set(row["instruments"].split(";")) == {GM_PROGRAM_TAGS[track.program] for track in pitched}
        assert len(drums) == 1 and f"drums---{GM_DRUM_KIT_TAGS[drums[0].program]}" in tags
        assert row["drum_kit"] == GM_DRUM_KIT_TAGS[drums[0].program]
        assert f"style---{row['style']}" in tags
        assert f"mood---{MOOD_OF[(row['mode'], row['energy'])]}" in tags
        tempo = midi.get_tempo_changes()[1][0]
        assert tempo == pytest.approx(float(row["tempo_bpm"]), abs=0.01)
        assert ("tempo---fast" in tags) == (tempo >= 120.0) and ("tempo---slow" in tags) == (tempo <= 90.0)
        key = midi.key_signature_changes[0].key_number  # pretty_midi: 0-11 major tonics, 12-23 minor
        assert ("minor" if key >= 12 else "major") == row["mode"]
        assert key % 12 == PITCH_CLASS[row["key"]]
        assert midi.time_signature_changes[0].numerator == (3 if row["style"] == "waltz" else 4)


def test_splits_are_70_10_20_by_block_of_tracks_and_deterministic(cli_corpus):
    out, _ = cli_corpus
    frame = read_tracks(out)
    first_ten = frame["split"].tolist()[:10]  # one whole block of track numbers: exactly 7/1/2
    assert {name: first_ten.count(name) for name in ("train", "valid", "test")} == {"train": 7, "valid": 1, "test": 2}
    assert frame["split"].tolist() == split_assignment(TRACKS, SEED)
    assert {name: split_assignment(600, 0).count(name) for name in ("train", "valid", "test")} == {"train": 420, "valid": 60, "test": 120}
    assert split_assignment(600, 0) != split_assignment(600, 1)


def test_version_2_splits_are_the_ones_recorded():
    """The splits of generator version 2 as its corpora hold them (r train, a valid, e test), written down: runs
    and evaluations rely on a track keeping its split, so a change to how they are drawn needs a new generator
    version (as version 1's, VERSION_1_SPLITS, are kept), not a silent one."""
    def letters(count: int, seed: int) -> str:
        return "".join({"train": "r", "valid": "a", "test": "e"}[name] for name in split_assignment(count, seed))

    assert letters(40, 0) == "rerrrrarererrrarrerrrrrrrarreearrrrerrre"
    assert letters(30, 7) == "rererrrrraarrrrrrreerreerrrrra"


def test_tempo_tags_start_at_their_bounds():
    from musicssl.corpus.tags import tempo_tag

    assert (tempo_tag(120.0), tempo_tag(119.9), tempo_tag(90.1), tempo_tag(90.0)) == (
        "tempo---fast", None, None, "tempo---slow")


def test_a_tracks_split_does_not_depend_on_the_corpus_size():
    """A track's audio is a function of (seed, number); so is its split. Corpora of two sizes from one
    seed hold their shared tracks in one split each (generator version 1 drew them apart: 51 of the
    600-track corpus's 120 test tracks were training tracks of the 2000-track corpus)."""
    for seed in (0, 3):
        largest = split_assignment(2000, seed)
        for tracks in (10, 11, 19, 120, 600, 1999):
            assert split_assignment(tracks, seed) == largest[:tracks], (seed, tracks)
        for start in range(0, 2000, 10):  # every block of ten numbers holds exactly 7/1/2
            block = largest[start : start + 10]
            assert (block.count("train"), block.count("valid"), block.count("test")) == (7, 1, 2)
    for tracks in range(10, 40):  # the smallest corpora still have every split
        assert set(split_assignment(tracks, 5)) == {"train", "valid", "test"}
    # Blocks are shuffled independently: the 60 blocks of the default corpus are not all one pattern.
    default = split_assignment(600, 0)
    assert len({tuple(default[start : start + 10]) for start in range(0, 600, 10)}) > 30


def test_the_test_tracks_a_corpus_of_another_size_or_version_trained_on_are_found():
    from musicssl.corpus.splits import seen_test_tracks, split_assignment, split_assignment_version_1

    def identity(version, tracks, seed=0):
        return {"generator_version": version, "seed": seed, "tracks": tracks, "seconds": 30.0}

    def test_ids(version, tracks, seed=0):
        rule = split_assignment_version_1 if version == 1 else split_assignment
        return [f"track{n:05d}" for n, split in enumerate(rule(tracks, seed)) if split == "test"]

    # Version 1: 51 of the default corpus's 120 test tracks were training tracks of the 2000-track corpus of
    # its seed (counted on the two corpora as built, tracks.csv against tracks.csv, before version 2).
    assert len(seen_test_tracks(identity(1, 2000), identity(1, 600), test_ids(1, 600))) == 51
    # Version 2: none, whatever the two sizes; none across seeds either.
    for trained, evaluated in ((2000, 600), (600, 2000), (17, 600), (600, 600)):
        assert seen_test_tracks(identity(2, trained), identity(2, evaluated), test_ids(2, evaluated)) == []
    assert seen_test_tracks(identity(1, 600, seed=1), identity(2, 600), test_ids(2, 600)) == []
    # A version-1 checkpoint on the version-2 default corpus: the test tracks version 1 put in train.
    version_1 = split_assignment_version_1(600, 0)
    seen = seen_test_tracks(identity(1, 600), identity(2, 600), test_ids(2, 600))
    assert seen == [track for track in test_ids(2, 600) if version_1[int(track[5:])] == "train"]
    assert 60 < len(seen) < 100  # about 70 % of the 120
    # Track numbers past the training corpus's last, and ids that are not a corpus's, were never trained on.
    assert seen_test_tracks(identity(1, 10), identity(2, 600), ["track00500", "clip01", "track"]) == []


def test_a_tracks_csv_edited_by_hand_is_not_taken_for_the_generated_corpus(tmp_path):
    """The corpus identity (which analysis.downstream uses to find test tracks a checkpoint trained on) is
    attached only while every listed track is in the split the generator gave it: a tracks.csv whose splits
    were edited would have its checkpoints judged by splits they did not train on."""
    from musicssl.corpus.splits import split_assignment
    from musicssl.data.index import TrackIndex

    splits = split_assignment(30, 2)
    frame = pd.DataFrame({"track_id": [f"track{n:05d}" for n in range(30)], "path": [f"audio/track{n:05d}.flac" for n in range(30)],
                          "split": splits, "tags": ["a"] * 30})
    (tmp_path / "corpus.json").write_text(json.dumps({"generator_version": 2, "config": {"tracks": 30, "seconds": 30.0, "seed": 2}}))
    frame.to_csv(tmp_path / "tracks.csv", index=False)
    identity = {"generator_version": 2, "seed": 2, "tracks": 30, "seconds": 30.0}
    assert TrackIndex.from_csv(tmp_path / "tracks.csv").extra["generated_corpus"] == identity
    frame.iloc[::3].to_csv(tmp_path / "tracks.csv", index=False)  # fewer tracks, each in its split: still the corpus
    assert TrackIndex.from_csv(tmp_path / "tracks.csv").extra["generated_corpus"] == identity
    edited = frame.assign(split=["train" if split == "test" else split for split in splits])  # test moved to train
    edited.to_csv(tmp_path / "tracks.csv", index=False)
    assert "generated_corpus" not in TrackIndex.from_csv(tmp_path / "tracks.csv").extra
    frame.assign(track_id=[f"song{n}" for n in range(30)]).to_csv(tmp_path / "tracks.csv", index=False)  # renamed
    assert "generated_corpus" not in TrackIndex.from_csv(tmp_path / "tracks.csv").extra
    (tmp_path / "corpus.json").write_text(json.dumps({"generator_version": 2, "config": {"tracks": 20, "seconds": 30.0, "seed": 2}}))
    frame.to_csv(tmp_path / "tracks.csv", index=False)  # numbers past the recorded size
    assert "generated_corpus" not in TrackIndex.from_csv(tmp_path / "tracks.csv").extra


def _load_all(folder: Path) -> tuple[pd.DataFrame, list[np.ndarray], list[bytes]]:
    frame = read_tracks(folder)
    audio = [soundfile.read(str(folder / path), dtype="int16")[0] for path in frame["path"]]
    midi = [(folder / path).read_bytes() for path in frame["midi"]]
    return frame, audio, midi


def test_one_worker_builds_exactly_what_two_workers_built(cli_corpus, cache, tmp_path):
    out, _ = cli_corpus
    build_corpus(tmp_path / "one", CorpusConfig(TRACKS, SECONDS, SEED), workers=1, bank_cache_dir=cache, progress=False)
    frame_two, audio_two, midi_two = _load_all(out)
    frame_one, audio_one, midi_one = _load_all(tmp_path / "one")
    pd.testing.assert_frame_equal(frame_one, frame_two)
    assert all(np.array_equal(a, b) for a, b in zip(audio_one, audio_two))
    assert midi_one == midi_two


def test_another_seed_gives_other_songs(cli_corpus, cache, tmp_path):
    out, _ = cli_corpus
    build_corpus(tmp_path / "other", CorpusConfig(TRACKS, SECONDS, SEED + 1), workers=2, bank_cache_dir=cache, progress=False)
    frame_a, audio_a, _ = _load_all(out)
    frame_b, audio_b, _ = _load_all(tmp_path / "other")
    factors = ["style", "key", "mode", "energy", "tempo_bpm", "instruments", "drum_kit"]
    same_factors = sum(frame_a.loc[i, factors].tolist() == frame_b.loc[i, factors].tolist() for i in range(TRACKS))
    assert same_factors == 0
    assert not any(np.array_equal(a, b) for a, b in zip(audio_a, audio_b))


def _max_normalised_cross_correlation(a: np.ndarray, b: np.ndarray, max_lag: int) -> float:
    best = 0.0
    for lag in range(-max_lag, max_lag + 1, 4):
        x, y = (a[lag:], b[: len(b) - lag]) if lag >= 0 else (a[:lag], b[-lag:])
        best = max(best, float(np.dot(x, y) / math.sqrt(np.dot(x, x) * np.dot(y, y))))
    return best


@pytest.mark.parametrize("style", list(STYLES))
def test_segments_8s_apart_share_the_instruments_but_not_the_content(style, bank):
    rng = np.random.default_rng(100 + list(STYLES).index(style))
    factors = draw_factors(rng)
    # The slowest tempo of the style: fewest bars between the segments, the likeliest to repeat.
    factors = dataclasses.replace(factors, style=style, tempo_bpm=STYLES[style].tempo_range[0])
    song = compose_song(factors, 16.0, rng)
    audio, _ = master(synthesize(song, bank, extra_seconds=1.0), draw_mix(rng), rng)
    first, second = audio[2 * 16000 : 6 * 16000], audio[10 * 16000 : 14 * 16000]
    # Not a loop: even at the best alignment within +-50 ms the two segments are far from equal.
    assert _max_normalised_cross_correlation(first, second, 800) < 0.8
    # Every part (hence every tag's instrument) sounds in both segments.
    for part in song.parts:
        for start in (2.0, 10.0):
            assert any(note.start < start + 4.0 and note.end > start for note in part.notes), (part.role, start)


def _chords_level_db(number: int, bank) -> float:
    """The chords part's energy against the whole mix's, in dB, for track ``number`` of seed 0 as the
    corpus builds it (before mastering, whose EQ and reverb move the ratio by about 1 dB)."""
    from musicssl.corpus.build import REVERB_MARGIN_SECONDS

    song_rng = np.random.default_rng([0, number, 0])
    factors = draw_factors(song_rng)
    song = compose_song(factors, 30.0, song_rng)
    gains = draw_mix(np.random.default_rng([0, number, 1])).part_gains_db
    mix = synthesize(song, bank, gains, extra_seconds=REVERB_MARGIN_SECONDS)
    chords = Song(factors, [part for part in song.parts if part.role == "chords"], song.seconds, song.sections)
    alone = synthesize(chords, bank, gains, extra_seconds=REVERB_MARGIN_SECONDS)
    return 10 * math.log10(float(np.sum(alone.astype(np.float64) ** 2) / np.sum(mix.astype(np.float64) ** 2)))


def test_synth_pad_holds_its_chords_and_is_heard_in_the_mix(bank, monkeypatch):
    """synth_pad's attack is slow (about 0.5 s to within 10 dB of its peak): playing the styles' short comping
    stabs (generator version 1) it stayed 17 dB below the mix in the median, so its tag was barely audible.
    It now holds each bar's chord, as the pad part does, and sits with the other parts."""
    from musicssl.corpus import compose

    numbers = [n for n in range(120) if draw_factors(np.random.default_rng([0, n, 0])).chords == "synth_pad"][:8]
    assert len(numbers) == 8
    for number in numbers:
        song_rng = np.random.default_rng([0, number, 0])
        song = compose_song(draw_factors(song_rng), 30.0, song_rng)
        chord_notes = next(part for part in song.parts if part.role == "chords").notes
        # Held: every chord note lasts at least 0.9 s (a comping stab lasts a fraction of a beat).
        assert min(note.end - note.start for note in chord_notes) > 0.9, number
    held = [_chords_level_db(n, bank) for n in numbers]
    monkeypatch.setattr(compose, "HELD_CHORD_INSTRUMENTS", frozenset())  # version 1: the style's comping
    stabs = [_chords_level_db(n, bank) for n in numbers]
    assert np.median(held) > -11.0 and min(held) > -15.0, held
    assert np.median(stabs) < -14.0 and np.median(held) - np.median(stabs) > 5.0, stabs


def test_instruments_and_drum_kits_are_drawn_independently_of_style():
    draws = [draw_factors(np.random.default_rng([7, n])) for n in range(4000)]
    for attribute in ("chords", "melody", "drum_kit"):
        table = pd.crosstab(pd.Series([d.style for d in draws]), pd.Series([getattr(d, attribute) for d in draws]))
        assert stats.chi2_contingency(table.to_numpy()).pvalue > 0.001, attribute


def test_corpus_constants_agree_with_the_track_index():
    from musicssl.corpus import build, tags
    from musicssl.data import index

    assert tags.GROUP_SEPARATOR == index.GROUP_SEPARATOR and build.SPLITS == index.SPLITS


def test_vocabulary_spans_the_required_groups_and_gm_families():
    assert 30 <= len(TAG_NAMES) <= 40
    groups = {tag.split("---")[0] for tag in TAG_NAMES}
    assert groups == {"style", "instrument", "drums", "mood", "tempo"}
    assert sum(tag.startswith("style---") for tag in TAG_NAMES) >= 6
    assert len({spec.program // 8 for spec in INSTRUMENTS}) >= 12  # GM families are blocks of 8 programs
    assert {GM_PROGRAM_TAGS[spec.program] for spec in INSTRUMENTS} == {spec.name for spec in INSTRUMENTS}


def test_note_bank_synthesis_matches_rendering_the_song_with_midirenderer(bank):
    front_end = LogMel()
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        song = compose_song(draw_factors(rng), 6.0, rng)
        direct = render_song_directly(song)
        from_bank = synthesize(song, bank)[: len(direct)]
        assert 20 * math.log10(np.sqrt(np.mean(from_bank**2) / np.mean(direct**2))) == pytest.approx(0.0, abs=0.5)
        mel_direct = front_end(torch.from_numpy(direct)).numpy()
        mel_bank = front_end(torch.from_numpy(from_bank)).numpy()
        audible = mel_direct > mel_direct.max() - 60.0
        assert np.abs(mel_bank - mel_direct)[audible].mean() < 3.0  # dB
        assert np.corrcoef(mel_bank.ravel(), mel_direct.ravel())[0, 1] > 0.95


def test_velocity_and_release_follow_the_soundfont(bank):
    """A soft, short note from the bank has the level of the same note rendered by midirenderer."""
    rng = np.random.default_rng(0)
    template = compose_song(draw_factors(rng), 3.0, rng)
    # Instruments with a steady tone (the string ensemble's layers beat, so windows of it vary). The
    # electric bass's release is over in ~30 ms, too short to compare at the renderer's timing
    # resolution, so only its held part is compared.
    for program, name, pitch, windows in (
        (0, "piano", 60, ((0.5, 1.1), (1.1, 1.6))),
        (89, "synth_pad", 67, ((0.5, 1.1), (1.1, 1.6))),
        (11, "vibraphone", 72, ((0.5, 1.1), (1.1, 1.6))),
        (33, "electric_bass", 40, ((0.5, 1.1),)),
    ):
        song = Song(template.factors, [Part("melody", name, program, False, [Note(0.5, 1.1, pitch, 45)])], 3.0, ["verse"])
        direct, from_bank = render_song_directly(song), synthesize(song, bank)[: 3 * 16000]
        for start, stop in windows:  # while held, then during the release
            window = slice(int(start * 16000), int(stop * 16000))
            ratio_db = 10 * math.log10(np.mean(from_bank[window] ** 2) / np.mean(direct[window] ** 2))
            assert ratio_db == pytest.approx(0.0, abs=1.5), (name, start)


def test_shelving_filters_have_the_requested_gain():
    for high, frequency in ((False, 200.0), (True, 3000.0)):
        _, response = signal.sosfreqz(_shelf(frequency, 6.0, 16000, high)[None], worN=[1.0, frequency, 7999.0], fs=16000)
        gains = 20 * np.log10(np.abs(response))
        far, corner, near = (gains[2], gains[1], gains[0]) if not high else (gains[0], gains[1], gains[2])
        assert near == pytest.approx(6.0, abs=0.05) and far == pytest.approx(0.0, abs=0.05)
        assert corner == pytest.approx(3.0, abs=0.05)  # RBJ shelves are half-way (in dB) at the corner


def test_midi_written_directly_reads_back_like_pretty_midis_own():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        song = compose_song(draw_factors(rng), 10.0, rng)
        mine = pretty_midi.PrettyMIDI(io.BytesIO(song.midi_bytes()))
        reference = song.to_midi()
        assert [(t.program, t.is_drum, t.name) for t in mine.instruments] == [(t.program, t.is_drum, t.name) for t in reference.instruments]
        for a, b in zip(mine.instruments, reference.instruments):
            # By pitch, then time: notes of one pitch are far more than a tick apart, so the order is
            # the same in both files whatever the rounding to ticks.
            a_notes = sorted((n.pitch, n.start, n.velocity, n.end) for n in a.notes)
            b_notes = sorted((n.pitch, n.start, n.velocity, n.end) for n in b.notes)
            assert len(a_notes) == len(b_notes)
            tick = 60.0 / song.factors.tempo_bpm / 480
            for x, y in zip(a_notes, b_notes):
                assert x[0] == y[0] and x[2] == y[2] and abs(x[1] - y[1]) <= tick and abs(x[3] - y[3]) <= tick, (x, y)
        assert mine.key_signature_changes[0].key_number == reference.key_signature_changes[0].key_number


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tracks", "3"], ": error: --tracks must be an integer >= 10"),
        (["--seconds", "1"], ": error: --seconds must be between 8 and 600"),
        (["--seconds", "nan"], ": error: --seconds must be between 8 and 600"),
        (["--seed", "-1"], ": error: --seed must be a non-negative integer"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--tracks", "many"], "invalid int value: 'many'"),
    ],
)
def test_bad_cli_arguments_exit_2_with_a_message(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main([*arguments, "--out", str(tmp_path / "corpus")])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()


def test_the_size_of_a_corpus_is_estimated_within_a_tenth(cli_corpus):
    """The estimate that the check of room uses, against a corpus built: its files' bytes on disk."""
    out, result = cli_corpus
    assert result.returncode == 0, result.stderr
    written = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    estimate = corpus_bytes(CorpusConfig(TRACKS, SECONDS, SEED))
    assert 0.9 * written <= estimate <= 1.1 * written, (estimate, written)


def test_a_corpus_larger_than_the_room_on_its_disk_is_refused_before_anything_is_built(tmp_path, cache, bank, capsys):
    """A billion tracks of 30 s (21 kB a second of FLAC and 5.5 kB of MIDI and index each) take about
    636 TB: refused at once with both sizes, not after the split
    assignment and the build (which filled the disk and ended in a traceback of libsndfile's
    "System error.")."""
    started = time.perf_counter()
    code, _, err = run_main(cli_main, ["--tracks", "1000000000", "--out", str(tmp_path / "corpus"), "--cache-dir",
                                       str(cache)], capsys)
    assert code == 2 and "Traceback" not in err
    free = shutil.disk_usage(tmp_path).free
    assert "1000000000 tracks of 30 s take about 636 TB, and " in err and f"{tmp_path} has " in err
    reported = float(err.split(" has ")[1].split(" free")[0].split()[0])
    unit = err.split(" has ")[1].split(" free")[0].split()[1]
    assert reported == pytest.approx(free / {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit], rel=0.05)
    assert "build fewer or shorter tracks, or in a folder on a disk with room" in err
    assert not (tmp_path / "corpus").exists() and list(tmp_path.iterdir()) == []
    assert time.perf_counter() - started < 10


def test_a_disk_that_fills_during_the_build_ends_it_saying_so_and_leaves_nothing(small_disk, cache, bank,
                                                                                  monkeypatch):
    """The estimate passes (here made small on purpose) but the disk fills: one message that says what
    the corpus needs, and the partial build is removed, which frees the disk again."""
    import musicssl.corpus.build as build

    disk = small_disk(2_000_000)
    monkeypatch.setattr(build, "AUDIO_BYTES_PER_SECOND", 1)
    with pytest.raises(CorpusError) as refused:
        build_corpus(disk.path / "corpus", CorpusConfig(40, 8.0, 1), workers=2, bank_cache_dir=cache, progress=False)
    message = str(refused.value)
    assert f"{disk.path}: its disk filled after " in message and " of 40 tracks" in message
    assert "the partial build is removed: free some space" in message
    assert list(disk.path.iterdir()) == []
    assert shutil.disk_usage(disk.path).used < 100_000


def test_a_cache_dir_that_is_a_file_exits_2_naming_it(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(SystemExit) as exited:
        cli_main(["--tracks", "10", "--out", str(tmp_path / "corpus"), "--cache-dir", str(taken)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    # Named with its flag (before: "File exists; give --out and --cache-dir folders you can write in").
    assert f"error: --cache-dir {taken}: a file is in the way of the folder to be made; give --cache-dir a folder you " \
           "can write in" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exited:  # a file on the way to it
        cli_main(["--tracks", "10", "--out", str(tmp_path / "corpus"), "--cache-dir", str(taken / "bank")])
    assert exited.value.code == 2
    assert f"error: --cache-dir {taken / 'bank'}: a file is in the way" in capsys.readouterr().err


def test_a_note_bank_inside_the_corpus_folder_and_an_empty_out_are_refused_before_building(tmp_path, capsys,
                                                                                             monkeypatch):
    """Before: the whole build ran, then failed to move the corpus into place ("[Errno 39] Directory not
    empty" naming the staging folder, already gone), and the bank left in --out made a rerun refuse it;
    --out "" was the current folder."""
    (tmp_path / "o1").mkdir()
    cases = [
        (["--out", str(tmp_path / "o1"), "--cache-dir", str(tmp_path / "o1" / "bank")],
         f"--cache-dir {tmp_path / 'o1' / 'bank'} is inside {tmp_path / 'o1'}, which the finished corpus replaces"),
        (["--out", ""], "argument --out: empty; give the folder the corpus goes in (new or empty)"),
        (["--out", str(tmp_path / "o1"), "--cache-dir", str(tmp_path / "o1" / ".." / "o1" / "bank")],
         f"is inside {tmp_path / 'o1'}, which the finished corpus replaces"),
    ]
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exited:
            cli_main(["--tracks", "10", *arguments])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # The default bank's folder (MUSICSSL_CACHE) inside --out: the same, in its words.
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "o1" / "cache"))
    with pytest.raises(SystemExit):
        cli_main(["--tracks", "10", "--out", str(tmp_path / "o1")])
    assert "the note bank's folder (MUSICSSL_CACHE)" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["o1"] and not any((tmp_path / "o1").iterdir())


def test_cli_refuses_a_non_empty_folder_and_an_existing_corpus_without_force(cli_corpus, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        cli_main(["--tracks", "10", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "is not empty and holds no generated corpus" in capsys.readouterr().err
    out, _ = cli_corpus
    with pytest.raises(SystemExit) as exited:
        cli_main(["--tracks", "10", "--out", str(out)])
    assert exited.value.code == 2 and "already holds a corpus" in capsys.readouterr().err
    # A user's own dataset (a tracks.csv, the format --data reads) is no corpus, even with --force. Before: the
    # message suggested --force, which then deleted the whole folder.
    mine = tmp_path / "mine"
    (mine / "audio").mkdir(parents=True)
    (mine / "tracks.csv").write_text("track_id,path,split,tags\na,audio/a.wav,train,rock\n")
    (mine / "audio" / "a.wav").write_bytes(b"precious")
    for force in ([], ["--force"]):
        with pytest.raises(SystemExit) as exited:
            cli_main(["--tracks", "10", "--out", str(mine), *force])
        assert exited.value.code == 2 and "is not empty and holds no generated corpus" in capsys.readouterr().err
    assert (mine / "audio" / "a.wav").read_bytes() == b"precious"
    # Before: --force replaced the whole folder, and what else lay in a corpus folder went with it, silently.
    (out / "my_notes.txt").write_text("mine")
    try:
        with pytest.raises(SystemExit) as exited:
            cli_main(["--tracks", "10", "--out", str(out), "--force"])
        assert exited.value.code == 2
        assert "holds a corpus and also my_notes.txt, which --force would delete with it" in capsys.readouterr().err
        assert (out / "my_notes.txt").read_text() == "mine" and (out / "tracks.csv").is_file()
    finally:
        (out / "my_notes.txt").unlink()
    # Before: --out . built, then swapped the folder the shell stood in for a new one (ls showed nothing there).
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(SystemExit) as exited:
        cli_main(["--tracks", "10", "--out", "."])
    assert exited.value.code == 2 and "is the folder this runs in (or holds it)" in capsys.readouterr().err
    assert here.is_dir() and Path.cwd().samefile(here)
    # An empty --cache-dir (an unset shell variable) is refused; before, the note bank went into the current folder.
    with pytest.raises(SystemExit) as exited:
        cli_main(["--tracks", "10", "--out", str(tmp_path / "new"), "--cache-dir", ""])
    assert exited.value.code == 2 and "argument --cache-dir: empty" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_bad_arguments_on_the_real_command_line_print_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "musicssl.corpus", "--tracks", "2", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "tracks must be an integer >= 10" in result.stderr


def test_ensure_corpus_builds_once_into_the_cache_and_atomically(cache, bank, tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICSSL_CACHE", str(cache))
    folder = ensure_corpus(tracks=10, seconds=8.0, seed=5)
    assert folder == cache / "corpus-10x8s-seed5-v2" and (folder / "tracks.csv").is_file()  # version 2
    written = (folder / "tracks.csv").stat().st_mtime_ns
    assert ensure_corpus(tracks=10, seconds=8.0, seed=5) == folder
    assert (folder / "tracks.csv").stat().st_mtime_ns == written  # found, not rebuilt

    # A build that fails half-way leaves neither the corpus folder nor its staging folder.
    import musicssl.corpus.build as build_module

    original = build_module.build_track

    def fail_on_track_4(number, *args, **kwargs):
        if number == 4:
            raise KeyboardInterrupt
        return original(number, *args, **kwargs)

    monkeypatch.setattr(build_module, "build_track", fail_on_track_4)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path / "half", CorpusConfig(10, 8.0, 0), workers=1, bank_cache_dir=cache, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_command_that_needs_the_corpus_another_is_building_waits_for_it_and_builds_nothing(cache, bank,
                                                                                             monkeypatch):
    """Before: commands started together on an empty cache (two searches, a search and a training run) each
    built the whole corpus (about a minute each on two cores; seen in review: three at once, three builds).
    Now the second waits, says so, and takes the first one's corpus; where the first stops without one, the
    one waiting builds it."""
    import fcntl

    from musicssl.corpus.build import default_corpus_dir

    monkeypatch.setenv("MUSICSSL_CACHE", str(cache))
    env = {**os.environ, "MUSICSSL_CACHE": str(cache)}
    folder = default_corpus_dir(10, 8.0, 7)
    assert folder.parent == cache and not folder.exists()
    code = ("import time; from musicssl.corpus.build import ensure_corpus; started = time.monotonic(); "
            "folder = ensure_corpus(tracks=10, seconds=8.0, seed=7); print(folder, round(time.monotonic() - started))")
    with open(cache / f".{folder.name}.build.lock", "a") as lock:  # as a build under way holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env)
        said = waiting.stderr.readline()
        assert said == f"corpus {folder}: another process is building it; waiting for it\n"
        build_corpus(folder, CorpusConfig(10, 8.0, 7), workers=1, bank_cache_dir=cache, progress=False)
        written = (folder / "tracks.csv").stat().st_mtime_ns
        time.sleep(1)
        assert waiting.poll() is None  # still waiting while the lock is held
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert out.split()[0] == str(folder) and err == ""  # nothing built: no progress, no line
    assert (folder / "tracks.csv").stat().st_mtime_ns == written

    # The build it waited for stopped without a corpus: the one waiting builds it.
    other = default_corpus_dir(10, 8.0, 8)
    with open(cache / f".{other.name}.build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = subprocess.Popen([sys.executable, "-c", code.replace("seed=7", "seed=8")], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        assert "waiting for it" in waiting.stderr.readline()
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert out.split()[0] == str(other) and (other / "tracks.csv").is_file()


def test_the_build_workers_end_quietly_under_a_parent_that_turns_sigterm_into_ctrl_c():
    """The search handles SIGTERM as Ctrl-C while it builds the corpus. Forked workers inherited that
    handler, and the pool's end (a SIGTERM to each worker) raised KeyboardInterrupt in them: a
    worker's traceback under the progress bar (seen on a fresh machine's first search), and now
    and then a pool that never ended. The workers now ignore Ctrl-C, which the parent handles, and
    end on SIGTERM without a word."""
    script = """
import signal
from musicssl.corpus.render import worker_pool

def as_ctrl_c(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, as_ctrl_c)
with worker_pool(2) as pool:
    handlers = pool.starmap(signal.getsignal, [(signal.SIGINT,), (signal.SIGTERM,)] * 2)
# Ctrl-C ignored and SIGTERM the default (pickled back as their numbers), not the parent's handler.
assert handlers == [signal.SIG_IGN, signal.SIG_DFL] * 2, handlers
for _ in range(20):  # with the parent's handler: 22 worker tracebacks in 20 pools, and a pool that hung
    with worker_pool(2) as pool:
        assert sorted(pool.imap_unordered(abs, range(-11, 12))) == sorted(abs(n) for n in range(-11, 12))
for _ in range(100):  # ended as soon as made: the SIGTERM can come before a worker has set its handlers
    with worker_pool(2):
        pass
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal_module.SIGKILL)  # the script and the workers of a pool that hung
        process.communicate()
        pytest.fail("a pool of workers did not end")
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


def _interrupt_the_build(out: Path, cache: Path, signals: list[int]) -> subprocess.CompletedProcess:
    """Run the corpus command (2 workers, the session's note bank) and send ``signals`` to it, 1 ms
    apart, once its staging folder holds two tracks."""
    command = [sys.executable, "-m", "musicssl.corpus", "--tracks", "40", "--seconds", "30", "--workers", "2",
               "--quiet", "--out", str(out)]
    from conftest import WITH_CTRL_C

    process = subprocess.Popen([*WITH_CTRL_C, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MUSICSSL_CACHE": str(cache)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(len(list(staging.glob("audio/*.flac"))) >= 2 for staging in out.parent.glob(f".{out.name}.partial-*")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        for signum in signals:
            process.send_signal(signum)
            time.sleep(0.001)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal_module.SIGKILL)  # the command and its workers, if anything is left
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("signals, code", [
    ([signal_module.SIGTERM], 143),
    ([signal_module.SIGINT, signal_module.SIGINT], 130),
], ids=["sigterm", "ctrl-c-twice"])
def test_an_interrupted_build_leaves_nothing_behind(signals, code, cache, bank, tmp_path):
    """A SIGTERM (kill, timeout, a batch scheduler) ended the command at once, without a word, and left
    its hidden staging folder (`.NAME.partial-*`, hundreds of MB for the default corpus). A second
    Ctrl-C right after the first (a double press, or `timeout -s INT`, which signals the process and
    then its group) cut the pool's end short: workers went on writing into the staging folder as it
    was removed, and it stayed (2 builds in 3)."""
    for attempt in range(2 if len(signals) > 1 else 1):
        out = tmp_path / f"corpus{attempt}"
        result = _interrupt_the_build(out, cache, signals)
        # A second Ctrl-C that comes after the cleanup, as Python shuts down, meets SIGINT's default action.
        assert result.returncode in ((code, -signal_module.SIGINT) if len(signals) > 1 else (code,)), result.stderr
        assert result.stderr.strip().splitlines()[-1] == "python -m musicssl.corpus: interrupted; nothing was left in --out"
        assert "Traceback" not in result.stderr
        time.sleep(0.2)  # a worker left running would write meanwhile
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_corpus_of_another_generator_version_is_built_again_or_refused(cache, bank, tmp_path, monkeypatch, capsys):
    """Before: any folder with a tracks.csv was the corpus, whatever version of the generator built it,
    so an upgrade that changes the audio kept training on the old corpus without a word."""
    from musicssl.corpus.build import GENERATOR_VERSION, ensure_corpus
    from musicssl.data.loaders import DatasetError, open_dataset

    def stamp(folder: Path, version) -> None:
        info = json.loads((folder / "corpus.json").read_text())
        (folder / "corpus.json").write_text(json.dumps({**info, "generator_version": version}))

    monkeypatch.setenv("MUSICSSL_CACHE", str(cache))
    given = ensure_corpus(tmp_path / "given", tracks=10, seconds=8.0)
    stamp(given, GENERATOR_VERSION - 1)
    message = rf"a corpus of generator version {GENERATOR_VERSION - 1}; this version builds version {GENERATOR_VERSION}"
    with pytest.raises(CorpusError, match=message + r", with other splits and some other audio: rebuild it with python "
                       r"-m musicssl.corpus --out \S+ --tracks 10 --seconds 8 --seed 0 --force"):
        ensure_corpus(given, tracks=10, seconds=8.0)
    with pytest.raises(DatasetError, match=message):  # as the command lines see it (--data corpus --root DIR)
        open_dataset("corpus", root=given, tracks=10, seconds=8.0)
    # The default folder is the toolkit's own: built again.
    default = ensure_corpus(tracks=10, seconds=8.0)
    try:
        stamp(default, GENERATOR_VERSION - 1)
        capsys.readouterr()
        assert ensure_corpus(tracks=10, seconds=8.0) == default
        assert f"built by generator version {GENERATOR_VERSION - 1}, this is {GENERATOR_VERSION}; building it again" \
            in capsys.readouterr().err
        assert json.loads((default / "corpus.json").read_text())["generator_version"] == GENERATOR_VERSION
    finally:  # the session's cache (its note bank) is shared; its default corpus is not this test's
        shutil.rmtree(default, ignore_errors=True)
    # Without a corpus.json (a corpus written by hand), a folder is taken as it is.
    (given / "corpus.json").unlink()
    assert ensure_corpus(given, tracks=10, seconds=8.0) == given


def test_a_ctrl_c_as_the_corpus_is_put_in_place_says_it_is_complete(cache, bank, tmp_path, monkeypatch, capsys):
    """The move into place holds a Ctrl-C until it is done, so the corpus is whole; before, the command
    then said "nothing was left in --out" of it, and running it again was refused ("already holds a
    corpus")."""
    import musicssl.corpus.build as build_module
    from musicssl.corpus.__main__ import main as corpus_main

    real_publish = build_module._publish

    def publish_then_ctrl_c(*arguments, **options):
        published = real_publish(*arguments, **options)
        os.kill(os.getpid(), signal_module.SIGINT)  # held until the move is done, then taken
        time.sleep(0.5)
        return published

    monkeypatch.setenv("MUSICSSL_CACHE", str(cache))
    monkeypatch.setattr(build_module, "_publish", publish_then_ctrl_c)
    previous = signal_module.signal(signal_module.SIGINT, signal_module.default_int_handler)
    try:
        arguments = ["--tracks", "10", "--seconds", "8", "--workers", "1", "--quiet", "--out", str(tmp_path / "c")]
        assert corpus_main(arguments) == 130
        err = capsys.readouterr().err
        assert err.strip() == f"python -m musicssl.corpus: interrupted as the corpus was put in place; it is " \
                              f"complete in {tmp_path / 'c'}"
        assert (tmp_path / "c" / "tracks.csv").is_file()
        # With --force, a Ctrl-C before the move leaves the corpus that was there, and says so.
        monkeypatch.setattr(build_module, "_publish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert corpus_main([*arguments, "--force"]) == 130
        assert capsys.readouterr().err.strip() == "python -m musicssl.corpus: interrupted; the corpus in --out is as it was"
    finally:
        signal_module.signal(signal_module.SIGINT, previous)


@pytest.mark.slow  # 9-10 s; run when the corpus build's staging folder or its clean-up changes
def test_a_build_killed_outright_leaves_its_staging_folder_to_the_next_build_only(cache, bank, tmp_path):
    """SIGKILL (out of memory, kill -9) gives the build no chance to clean up: its hidden staging folder
    (61 MB two seconds into the default corpus) stayed for good. A build here an hour later removes it,
    and never the staging folder of a build that is running (two builds of one corpus at once are fine)."""
    from musicssl.paths import remove_abandoned_staging, staging_folder

    out = tmp_path / "corpus"
    _interrupt_the_build(out, cache, [signal_module.SIGKILL])
    (left,) = tmp_path.glob(".corpus.partial-*")
    assert any(left.glob("audio/*.flac"))

    def build() -> None:
        result = subprocess.run([sys.executable, "-m", "musicssl.corpus", "--tracks", "10", "--seconds", "8",
                                 "--workers", "1", "--quiet", "--out", str(out), "--force"], capture_output=True,
                                text=True, timeout=300, env={**os.environ, "MUSICSSL_CACHE": str(cache)})
        assert result.returncode == 0, result.stderr

    # Minutes later it is kept: in containers sharing the host name and the cache, each with its own
    # process ids, a running build's process is not seen.
    build()
    assert left.is_dir()
    an_hour_ago = time.time() - 3700
    for folder in (left, *[path for path in left.iterdir() if path.is_dir()]):
        os.utime(folder, (an_hour_ago, an_hour_ago))
    build()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus"]
    # Which are removed: this host's of ended processes only.
    ours = staging_folder(tmp_path, ".x.partial-")  # this process runs
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".x.partial-{ours.name.split('~')[0][len('.x.partial-'):]}~{sleeper.pid}~abc"
        running.mkdir()
        ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        gone = tmp_path / f".x.partial-{ours.name.split('~')[0][len('.x.partial-'):]}~{int(ended.stdout)}~abc"
        other_host = tmp_path / f".x.partial-another-host~{int(ended.stdout)}~abc"
        older_name = tmp_path / ".x.partial-k2j4h5"
        for folder in (gone, other_host, older_name):
            folder.mkdir()
        assert remove_abandoned_staging(tmp_path, ".x.partial-") == []  # all recent
        assert remove_abandoned_staging(tmp_path, ".x.partial-", min_age=0) == [gone]
        assert all(folder.is_dir() for folder in (ours, running, other_host, older_name)) and not gone.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_build_that_another_build_of_another_corpus_beat_to_the_folder_fails(cache, bank, tmp_path, monkeypatch):
    """Two builds into one --out at once: the later one's folder could not be moved into place, and it
    reported success ("built 12 tracks ... in race") over the other one's corpus of 10. A build beaten
    by the same corpus (same settings, same files) still succeeds."""

    import musicssl.corpus.build as build_module

    other = tmp_path / "other"
    build_corpus(other, CorpusConfig(10, 8.0, 1), workers=1, bank_cache_dir=cache, progress=False)
    original = build_module.build_track

    def meanwhile_the_other_build_finishes(number, config, bank, out_dir, split):
        if number == 0 and not (tmp_path / "race").exists():
            shutil.copytree(other, tmp_path / "race")
        return original(number, config, bank, out_dir, split)

    monkeypatch.setattr(build_module, "build_track", meanwhile_the_other_build_finishes)
    with pytest.raises(CorpusError, match=r"race: another build finished a different corpus there while this one ran "
                                          r"\(tracks 10, seconds 8.0, seed 1\); this build \(12 tracks, 8 s, seed 2\) "
                                          r"was not kept: give another folder, or --force"):
        build_corpus(tmp_path / "race", CorpusConfig(12, 8.0, 2), workers=1, bank_cache_dir=cache, progress=False)
    assert json.loads((tmp_path / "race" / "corpus.json").read_text())["config"]["seed"] == 1
    shutil.rmtree(tmp_path / "race")
    report = build_corpus(tmp_path / "race", CorpusConfig(10, 8.0, 1), workers=1, bank_cache_dir=cache, progress=False)
    assert report.tracks == 10 and sorted(p.name for p in tmp_path.iterdir()) == ["other", "race"]


def test_an_out_folder_behind_a_symbolic_link_gets_the_corpus(cache, bank, tmp_path):
    """Before: into a link to an empty folder, the whole build ran and then failed ("Not a directory"); with
    force, the link itself was replaced by a new folder and the old corpus stayed where it pointed."""
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    build_corpus(link, CorpusConfig(10, 8.0, 1), workers=1, bank_cache_dir=cache, progress=False)
    assert link.is_symlink() and json.loads((target / "corpus.json").read_text())["config"]["seed"] == 1
    build_corpus(link, CorpusConfig(10, 8.0, 2), workers=1, bank_cache_dir=cache, progress=False, force=True)
    assert link.is_symlink() and json.loads((target / "corpus.json").read_text())["config"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    # A note bank inside the corpus, named through the link, is still refused before anything is built.
    with pytest.raises(CorpusError, match=r"--cache-dir .* is inside .*, which the finished corpus replaces"):
        build_corpus(link, CorpusConfig(10, 8.0, 3), workers=1, bank_cache_dir=link / "bank", progress=False,
                     force=True)
    assert not (target / "bank").exists()


def test_a_ctrl_c_while_a_rebuild_replaces_the_corpus_takes_effect_once_it_is_replaced(cache, bank, tmp_path,
                                                                                        monkeypatch, ctrl_c_handled):
    """With --force the old corpus is moved aside, the new one moved in and the old one removed (seconds
    for the default corpus). A Ctrl-C there left the old one half removed beside the new one, and the
    command said that nothing was left."""

    import musicssl.corpus.build as build_module

    out = tmp_path / "corpus"
    build_corpus(out, CorpusConfig(10, 8.0, 1), workers=1, bank_cache_dir=cache, progress=False)
    remove = shutil.rmtree

    def ctrl_c_while_removing(path, *arguments, **options):
        if ".old-" in str(path):
            os.kill(os.getpid(), signal_module.SIGINT)
        remove(path, *arguments, **options)

    monkeypatch.setattr(build_module.shutil, "rmtree", ctrl_c_while_removing)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(out, CorpusConfig(10, 8.0, 2), workers=1, bank_cache_dir=cache, progress=False, force=True)
    assert [path.name for path in tmp_path.iterdir()] == ["corpus"]
    assert json.loads((out / "corpus.json").read_text())["config"]["seed"] == 2


def test_the_corpus_and_the_note_bank_have_the_mode_mkdir_gives(cache, bank, tmp_path):
    """They were built in tempfile.mkdtemp folders (mode 0700) and renamed into place: the others of a
    group sharing the cache could not read them."""
    import stat

    mask = os.umask(0o027)
    try:
        build_corpus(tmp_path / "corpus", CorpusConfig(10, 8.0, 1), workers=1, bank_cache_dir=cache, progress=False)
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(mask)
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("corpus", "plain")}
    assert modes == {"corpus": 0o750, "plain": 0o750}
    # The session's note bank, rendered under this process's umask.
    assert stat.S_IMODE(bank.directory.stat().st_mode) == 0o777 & ~mask


def test_a_note_bank_folder_that_cannot_be_written_fails_before_the_rendering_and_names_the_folder(tmp_path,
                                                                                                   monkeypatch):
    """A read-only cache folder: the note bank was rendered (10 s or more), then the build failed naming
    a temporary folder in it. (Simulated: this test may run as root, whom file modes do not stop.)"""
    import errno
    import tempfile

    import musicssl.corpus.render as render_module

    real_mkdtemp = tempfile.mkdtemp

    def read_only(*arguments, dir=None, **options):
        if dir is not None and Path(dir) == tmp_path / "cache":
            raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / ".bank.partial-x1y2z3"))
        return real_mkdtemp(*arguments, dir=dir, **options)

    def never(*arguments):
        raise AssertionError("rendered")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(render_module, "_render_bank_chunk", never)
    with pytest.raises(OSError) as raised:
        ensure_note_bank(tmp_path / "cache", workers=1)
    assert (raised.value.errno, raised.value.filename) == (errno.EROFS, str(tmp_path / "cache"))


def test_config_rejects_bad_values_with_the_fix_in_the_message():
    with pytest.raises(CorpusError, match="tracks must be an integer >= 10"):
        CorpusConfig(tracks=5)
    with pytest.raises(CorpusError, match="seconds must be between"):
        CorpusConfig(seconds=1000.0)
    with pytest.raises(CorpusError, match=r"between 8 and 600, got 7\.9 \(training cuts two 4 s views"):
        CorpusConfig(seconds=7.9)


def test_a_folder_that_cannot_be_written_fails_before_the_note_bank_is_rendered(tmp_path, monkeypatch):
    """Before: the note bank was rendered first (10 s on a fresh machine), then the build failed with
    a raw error naming a temporary folder (`[Errno 2] No such file or directory: '/proc/.xx.partial-...'`)."""
    from musicssl.corpus.build import build_corpus

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    started = time.perf_counter()
    with pytest.raises(CorpusError, match=r"a-file/corpus: cannot create the corpus there \(.*\); give a folder you "
                                          r"can write"):
        build_corpus(blocker / "corpus", CorpusConfig(tracks=10, seconds=8.0), workers=1,
                     bank_cache_dir=tmp_path / "bank", progress=False)
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "bank").exists()
    # The default corpus's place is the cache folder: the message says how to move it.
    monkeypatch.setenv("MUSICSSL_CACHE", str(blocker))
    with pytest.raises(CorpusError, match=r"\(in the cache folder .*a-file, where corpora and mel caches are kept: set "
                                          r"MUSICSSL_CACHE to a folder you can write, with room for them\); give a folder you can write"):
        build_corpus(blocker / "corpus", CorpusConfig(tracks=10, seconds=8.0), workers=1,
                     bank_cache_dir=tmp_path / "bank", progress=False)


def test_the_shortest_corpus_gives_every_track_its_training_views(cli_corpus, tmp_path):
    """MIN_SECONDS is what the view sampler needs, no less: a corpus that builds can be trained on."""
    from musicssl.data.cache import LogMelConfig, MelCache
    from musicssl.data.views import ViewConfig, ViewDataset

    settings = LogMelConfig()
    needed = ViewConfig().in_frames(settings).min_track_frames
    samples = round(MIN_SECONDS * SAMPLE_RATE)
    assert settings.num_frames(samples) >= needed > settings.num_frames(samples - settings.hop_length)
    out, _ = cli_corpus
    assert SECONDS == MIN_SECONDS
    cache = MelCache.build(TrackIndex.from_csv(out / "tracks.csv"), tmp_path / "mels", workers=0, progress=False,
                           verbose=False)
    views = ViewDataset(cache, verbose=False)
    assert views.skipped_short == [] and len(views) == TRACKS
    assert views[0][0].shape == (2, 128, 126)


@pytest.mark.slow
def test_default_corpus_builds_within_a_minute_including_the_note_bank(tmp_path):
    started = time.perf_counter()
    report = build_corpus(tmp_path / "default", CorpusConfig(), bank_cache_dir=tmp_path / "cache", progress=False)
    elapsed = time.perf_counter() - started
    print(f"\n{report.summary()} (note bank {report.bank_seconds:.1f} s)")
    assert len(TrackIndex.from_csv(tmp_path / "default" / "tracks.csv")) == 600
    assert elapsed <= 60.0


def test_the_package_loads_its_modules_on_first_use_and_gives_what_an_eager_import_gave():
    """``python -m musicssl.corpus`` sets its Ctrl-C handler before numpy loads, so the package imports
    nothing heavy itself; its names and submodules come on first use."""
    code = ("import sys, musicssl.corpus as c; assert 'numpy' not in sys.modules, 'numpy loaded'; "
            "import musicssl.corpus.build as b; assert c.build is b and c.ensure_corpus is b.ensure_corpus; "
            "assert c.tags.TAG_NAMES is c.TAG_NAMES; assert sorted(dir(c)).count('ensure_corpus') == 1; "
            "from musicssl.corpus import *; assert callable(draw_factors)\n"
            "try:\n    c.ensure_corpous\nexcept AttributeError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "module 'musicssl.corpus' has no attribute 'ensure_corpous'\n"
