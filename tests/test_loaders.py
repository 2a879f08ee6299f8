"""Dataset loaders against fixture files written in each dataset's exact on-disk format.

Expected ids, paths, splits, tags and label matrices are written out by hand from the fixtures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from musicssl.audio import AudioError, load_audio
from musicssl.data.index import TrackIndex, TrackIndexError
from musicssl.data.loaders import (
    DatasetError,
    assign_splits,
    load_folder,
    load_jamendo,
    load_msd,
    load_mtat,
    open_dataset,
    open_dataset_option,
)

SAMPLE_RATE = 16000
LOGGER = "musicssl.data.loaders"


def write_sine(path: Path, frequency: float = 440.0, seconds: float = 0.1) -> Path:
    """A short real audio file; the format follows the extension (wav, flac, mp3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    time = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * frequency * time)).astype(np.float32), SAMPLE_RATE)
    return path


def assert_index(index: TrackIndex, ids, paths, splits, tags, tag_names, labels) -> None:
    assert index.track_ids == ids
    assert index.paths == [str(p) for p in paths]
    assert all(Path(p).is_absolute() for p in index.paths)
    assert index.tracks["split"].tolist() == splits
    assert [tuple(t) for t in index.tracks["tags"]] == [tuple(t) for t in tags]
    assert index.tag_names == tag_names
    np.testing.assert_array_equal(index.labels(), np.asarray(labels, dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# load_folder


def test_folder_csv_with_path_tags_and_split(tmp_path):
    root = tmp_path / "music"
    for relative in ("audio/a.wav", "audio/b.flac", "c.mp3", "sub/d.wav"):
        write_sine(root / relative)
    (root / "tags.csv").write_text(
        "path,tags,split\n"
        "audio/a.wav,rock;guitar,train\n"
        'audio/b.flac,"jazz; piano",valid\n'
        "c.mp3,,test\n"
        "sub/d.wav,rock,validation\n"
    )
    index = load_folder(root)
    base = root.resolve()
    assert_index(
        index,
        ids=["audio/a", "audio/b", "c", "sub/d"],
        paths=[base / "audio/a.wav", base / "audio/b.flac", base / "c.mp3", base / "sub/d.wav"],
        splits=["train", "valid", "test", "valid"],
        tags=[("rock", "guitar"), ("jazz", "piano"), (), ("rock",)],
        tag_names=["guitar", "jazz", "piano", "rock"],
        labels=[[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]],
    )
    assert index.name == "music"
    assert index.extra["missing"] == [] and index.extra["audio_checked"] is True
    assert index.extra["split_rule"] == "split column"
    # The other common names of the three splits, in any case.
    (root / "tags.csv").write_text("path,tags,split\naudio/a.wav,rock,Training\naudio/b.flac,jazz,val\n"
                                   "c.mp3,,Testing\nsub/d.wav,rock,DEV\n")
    assert load_folder(root).tracks["split"].tolist() == ["train", "valid", "test", "valid"]


def test_folder_tab_separated_file_named_csv(tmp_path):
    """MagnaTagATune's annotations_final.csv is tab-separated and double-quoted despite its name."""
    root = tmp_path / "tabbed"
    write_sine(root / "f" / "clip-1.mp3")
    write_sine(root / "0" / "clip-2.mp3")
    (root / "annotations.csv").write_text(
        '"track_id"\t"guitar"\t"no voice"\t"path"\t"split"\n'
        '"2"\t"1"\t"0"\t"f/clip-1.mp3"\t"test"\n'
        '"6"\t"0"\t"1"\t"0/clip-2.mp3"\t"train"\n'
    )
    index = load_folder(root)
    base = root.resolve()
    assert_index(
        index,
        ids=["2", "6"],
        paths=[base / "f/clip-1.mp3", base / "0/clip-2.mp3"],
        splits=["test", "train"],
        tags=[("guitar",), ("no voice",)],
        tag_names=["guitar", "no voice"],
        labels=[[1, 0], [0, 1]],
    )
    # A comma-separated .csv whose cells hold tabs is still read with commas.
    (root / "annotations.csv").write_text('path,tags,split\nf/clip-1.mp3,"a\tb",test\n0/clip-2.mp3,b,train\n')
    assert [tuple(tags) for tags in load_folder(root).tracks["tags"]] == [("a\tb",), ("b",)]


def test_folder_tsv_with_filename_comma_tags_and_seeded_split(tmp_path):
    root = tmp_path / "clips"
    names = [f"f{i}.wav" for i in range(10)]
    lines = ["filename\ttags\tduration"]
    for i, name in enumerate(names):
        write_sine(root / name, frequency=200.0 + 50 * i)
        tags = "genre---rock, instrument---piano" if i % 2 == 0 else "genre---jazz"
        lines.append(f"{name}\t{tags}\t{10 + i}.5")
    (root / "labels.tsv").write_text("\n".join(lines) + "\n")
    index = load_folder(root, split_seed=3)

    ids = [f"f{i}" for i in range(10)]
    assert index.track_ids == ids
    assert index.paths == [str(root.resolve() / name) for name in names]
    assert index.tag_names == ["genre---jazz", "genre---rock", "instrument---piano"]
    assert index.tag_groups == {"genre": ["genre---jazz", "genre---rock"], "instrument": ["instrument---piano"]}
    expected_labels = [[0, 1, 1] if i % 2 == 0 else [1, 0, 0] for i in range(10)]
    np.testing.assert_array_equal(index.labels(), np.asarray(expected_labels, dtype=np.float32))
    assert index.tracks["duration"].tolist() == [10.5 + i for i in range(10)]

    # The documented recipe, per track: u from SHA-256 of "seed:id"; train below 0.7, valid below 0.8.
    expected = {track_id: recipe_split(track_id, 3) for track_id in ids}
    assert dict(zip(index.track_ids, index.tracks["split"])) == expected
    assert index.extra["split_rule"] == "assign_splits" and index.extra["split_seed"] == 3


def recipe_split(track_id: str, seed: int, fractions=(0.7, 0.1, 0.2)) -> str:
    """assign_splits's rule written out: the top 53 of the first 64 bits of SHA-256("seed:id") / 2**53."""
    position = (int(hashlib.sha256(f"{seed}:{track_id}".encode()).hexdigest()[:16], 16) >> 11) / 2**53
    return "train" if position < fractions[0] else ("valid" if position < fractions[0] + fractions[1] else "test")


def test_assign_splits_follows_the_recipe_in_any_order():
    ids = [f"track{i:03d}" for i in range(200)] + ["ünïcode/path id"]
    forward = assign_splits(ids, seed=7)
    assert forward == {track_id: recipe_split(track_id, 7) for track_id in ids}
    assert assign_splits(list(reversed(ids)), seed=7) == forward
    assert assign_splits(ids, seed=8) != forward
    assert assign_splits(ids, (0.5, 0.3, 0.2), seed=7) == {t: recipe_split(t, 7, (0.5, 0.3, 0.2)) for t in ids}
    assert set(assign_splits(ids, (1.0, 0.0, 0.0)).values()) == {"train"}
    assert set(assign_splits(ids, (0.0, 0.0, 1.0)).values()) == {"test"}
    with pytest.raises(DatasetError, match="summing to 1"):
        assign_splits(ids, fractions=(0.5, 0.1, 0.1))


def test_a_split_group_column_draws_one_split_per_group(tmp_path, caplog):
    """Tracks that share a ``split_group`` value (an artist) share the split drawn for that value, by the same
    recipe as a track's with ``split_group=VALUE`` as the id; a track with an empty cell keeps the split it has
    without the column. The column is kept in the index, and its name is read in any case."""
    root = tmp_path / "music"
    lines = ["path,tags,Split_Group"]
    for number in range(60):
        write_sine(root / f"s{number:02d}.wav", frequency=200.0 + 10 * number)
        group = "" if number % 10 == 9 else f"Artist {number // 3}"  # 3 songs each, one in 10 without an artist
        lines.append(f"s{number:02d}.wav,{'rock' if number % 2 else 'jazz'},{group}")
    (root / "tags.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        index = load_folder(root, split_seed=5)
    groups = {f"s{n:02d}": "" if n % 10 == 9 else f"Artist {n // 3}" for n in range(60)}
    expected = {track_id: recipe_split(f"split_group={group}" if group else track_id, 5)
                for track_id, group in groups.items()}
    assert dict(zip(index.track_ids, index.tracks["split"])) == expected
    assert dict(zip(index.track_ids, index.tracks["split_group"])) == groups
    assert index.extra["split_rule"] == "assign_splits by split_group" and index.extra["split_seed"] == 5
    by_group = {}
    for track_id, split in expected.items():
        if groups[track_id]:
            by_group.setdefault(groups[track_id], set()).add(split)
    assert all(len(splits) == 1 for splits in by_group.values())
    assert len({splits.pop() for splits in by_group.values()}) == 3  # the groups do fall in all three splits
    assert "6 track(s) have an empty split_group cell, e.g. s09; each keeps the split it has without the column" in caplog.text
    counts = {name: list(expected.values()).count(name) for name in ("train", "valid", "test")}
    assert (f"60 tracks in {len(by_group) + 6} groups (a track without one is a group of its own), splits drawn by "
            f"split_group: train {counts['train']}, valid {counts['valid']}, test {counts['test']}") in caplog.text

    # Read without grouping (a run that read the table before it had the column): each track's own split.
    plain = load_folder(root, split_seed=5, split_groups=False)
    assert dict(zip(plain.track_ids, plain.tracks["split"])) == {t: recipe_split(t, 5) for t in groups}
    assert plain.extra["split_rule"] == "assign_splits" and plain.tracks["split_group"].tolist() == list(groups.values())
    # open_dataset_option (seed 0) passes that on to a tags file, and leaves a track index alone.
    assert open_dataset_option(str(root / "tags.csv"), split_groups=False).tracks["split"].tolist() == \
        [recipe_split(track_id, 0) for track_id in groups]
    assert open_dataset_option(str(root)).tracks["split"].tolist() == \
        [recipe_split(f"split_group={group}" if group else track_id, 0) for track_id, group in groups.items()]
    index.to_csv(tmp_path / "tracks.csv")
    assert open_dataset_option(str(tmp_path / "tracks.csv"), split_groups=False).tracks["split"].tolist() == \
        index.tracks["split"].tolist()


def test_a_split_group_column_with_0_1_tag_columns_is_no_tag_and_cannot_join_a_split_column(tmp_path, caplog):
    root = tmp_path / "music"
    lines = ["path,rock,jazz,split_group"]
    for number in range(8):
        write_sine(root / f"s{number}.wav")
        lines.append(f"s{number}.wav,{number % 2},{1 - number % 2},band{number // 4}")
    (root / "tags.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = load_folder(root)
    assert index.tag_names == ["rock", "jazz"]
    splits = dict(zip(index.track_ids, index.tracks["split"]))
    assert splits == {f"s{n}": recipe_split(f"split_group=band{n // 4}", 0) for n in range(8)}
    # Two groups cannot fill three splits: said, once for the empty split(s), and for a share far off its fraction.
    empty = [name for name in ("train", "valid", "test") if name not in splits.values()]
    assert f"none of the 2 groups fell in split(s) {empty}" in caplog.text
    assert "splits drawn by split_group hold" in caplog.text and "give a split column to choose the splits" in caplog.text

    (root / "tags.csv").write_text("path,rock,split,split_group\ns0.wav,1,train,a\ns1.wav,0,test,b\n")
    with pytest.raises(DatasetError, match=r"has both a 'split' column, which gives each track its split, and a "
                                           r"'split_group' column, which draws the splits by group; keep one"):
        load_folder(root)


def test_split_groups_keep_copies_of_a_recording_together_and_stay_text_in_a_track_index(tmp_path, caplog):
    """Copies of one recording share a split (files that differ only in their extension, MTG-Jamendo's .low.mp3):
    a copy with an empty cell takes its twin's group, and twins in two groups are refused. Every cell empty is the
    split without the column, with no warning of shares. Groups 1, 1.0 and 01 stay three in a tracks.csv."""
    root = tmp_path / "music"
    names = ["x.wav", "x.flac", "41/241.mp3", "41/241.low.mp3", "y.wav", "z.wav", "w.wav"]
    for name in names:
        write_sine(root / name)
    groups = ["", "1", "01", "", "1.0", "", "1"]
    rows = ["path,tags,split_group", *(f"{name},rock,{group}" for name, group in zip(names, groups))]
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    index = load_folder(root, split_seed=2)
    shared = {"x.wav": "1", "x.flac": "1", "41/241": "01", "41/241.low": "01", "y": "1.0", "z": "", "w": "1"}
    assert dict(zip(index.track_ids, index.tracks["split_group"])) == shared
    assert dict(zip(index.track_ids, index.tracks["split"])) == {
        track_id: recipe_split(f"split_group={group}" if group else track_id, 2) for track_id, group in shared.items()}
    index.to_csv(tmp_path / "tracks.csv")
    assert TrackIndex.from_csv(tmp_path / "tracks.csv").tracks["split_group"].tolist() == list(shared.values())

    rows[1:3] = ["x.wav,rock,1", "x.flac,rock,2"]
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=r"copies of one recording name different split_group values \(x.wav in "
                                           r"'1', x.flac in '2'\); give them one, as copies share a split"):
        load_folder(root)

    (root / "tags.csv").write_text("path,tags,split_group\n" + "".join(f"{name},rock,\n" for name in names))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        empty = load_folder(root, split_seed=2)
    assert empty.tracks["split"].tolist() == load_folder(root, split_seed=2, split_groups=False).tracks["split"].tolist()
    assert "7 track(s) have an empty split_group cell" in caplog.text and "far from its fraction" not in caplog.text


def test_adding_or_removing_tracks_moves_no_other_track():
    ids = [f"clip-{i}" for i in range(2000)]
    before = assign_splits(ids, seed=1)
    changed = ids[300:] + [f"new-{i}" for i in range(700)]  # 300 removed, 700 added
    after = assign_splits(changed, seed=1)
    kept = ids[300:]
    assert {track_id: after[track_id] for track_id in kept} == {track_id: before[track_id] for track_id in kept}
    assert assign_splits(ids[:1], seed=1) == {ids[0]: before[ids[0]]}


def test_assign_splits_meets_the_fractions_on_many_tracks():
    ids = [f"{i:06d}" for i in range(40000)]
    for fractions, seed in [((0.7, 0.1, 0.2), 0), ((0.8, 0.05, 0.15), 11)]:
        splits = list(assign_splits(ids, fractions, seed).values())
        for name, fraction in zip(("train", "valid", "test"), fractions):
            # Binomial counts: 5 standard deviations is at most 0.0125 here.
            assert splits.count(name) / len(ids) == pytest.approx(fraction, abs=5 * (0.25 / len(ids)) ** 0.5)


def test_assign_splits_is_the_same_in_another_process():
    """Python's own hash() is salted per process; the split must not be."""
    ids = [f"song {i}" for i in range(300)]
    code = (
        "import json, sys; from musicssl.data.loaders import assign_splits; "
        "print(json.dumps(assign_splits(json.loads(sys.argv[1]), seed=5)))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        completed = subprocess.run(
            [sys.executable, "-c", code, json.dumps(ids)], capture_output=True, text=True, check=True, timeout=120,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        outputs.append(json.loads(completed.stdout))
    assert outputs[0] == outputs[1] == assign_splits(ids, seed=5)


def test_audio_of_formats_not_read_here_is_named_when_a_folder_is_read_without_tags(tmp_path, caplog):
    """Before: a folder of .wav and .m4a/.wma files (an iTunes library) was read as its .wav files alone, without a
    word about the others."""
    root = tmp_path / "library"
    for name in ("a.wav", "sub/b.wav"):
        write_sine(root / name)
    for name in ("c.m4a", "sub/d.M4A", "e.wma", ".hidden.m4a", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not decoded here")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = load_folder(root, unlabeled=True)
    assert index.track_ids == ["a", "sub/b"]
    assert (f"{root}: 3 audio file(s) in formats not read here were left out (.m4a: 2, .wma: 1), e.g. c.m4a; convert "
            "to FLAC or WAV, e.g. ffmpeg -i IN.m4a OUT.flac") in caplog.text
    # Listed by track id in a tags file, such a file is the track's (its decoding then names the format), not "not
    # found" as before.
    (root / "tags.csv").write_text("track_id,tags\na,rock\nc,pop\nsub/d,jazz\n")
    index = load_folder(root)
    assert dict(zip(index.track_ids, index.tracks["path"])) == {
        "a": str(root / "a.wav"), "c": str(root / "c.m4a"), "sub/d": str(root / "sub" / "d.M4A")}
    with pytest.raises(AudioError, match=re.escape("c.m4a: cannot decode audio: a .m4a file, a format not read here")):
        load_audio(root / "c.m4a")
    (root / "tags.csv").unlink()
    # With nothing else, the error says so.
    for name in ("a.wav", "sub/b.wav"):
        (root / name).unlink()
    with pytest.raises(DatasetError, match=re.escape("found 5 other file(s) such as ['.hidden.m4a', 'c.m4a', 'e.wma']); "
                                                     ".m4a, .wma files are not read here: convert to FLAC or WAV")):
        load_folder(root, unlabeled=True)


def test_a_tags_cell_that_holds_a_missing_values_mark_has_no_tags(tmp_path, caplog):
    """Before: R's write.table writes an empty cell as NA, pandas as nan: each became a tag ('NA', 'nan'), which the
    probes then learned and scored, without a word."""
    root = tmp_path / "songs"
    cells = ["rock", "NA", "", "pop;rock", " nan ", "#N/A", "NA;rock", "n/a"]
    for number in range(len(cells)):
        write_sine(root / f"s{number}.wav")
    (root / "tags.csv").write_text("path,tags\n" + "".join(f"s{n}.wav,{cell}\n" for n, cell in enumerate(cells)))
    with caplog.at_level(logging.WARNING, logger="musicssl.data.index"):
        index = load_folder(root)
    assert [tuple(tags) for tags in index.tracks.sort_values("track_id")["tags"]] == [
        ("rock",), (), (), ("pop", "rock"), (), (), ("NA", "rock"), ()]  # (a mark among tags is a tag)
    assert index.tag_names == ["NA", "pop", "rock"]
    assert (f"{root / 'tags.csv'}: 4 row(s) hold 'NA' or 'nan' or '#N/A' or 'n/a' as their tags, a missing value as "
            "R, pandas or a spreadsheet writes an empty cell: read as no tags (e.g. line 3)") in caplog.text
    # The marks are pandas' own missing values (read_csv's default na_values, but the empty cell), and None.
    from pandas._libs.parsers import STR_NA_VALUES

    from musicssl.data.index import MISSING_MARKS

    assert MISSING_MARKS == (STR_NA_VALUES - {""}) | {"None"}
    # A track index alike.
    caplog.clear()
    (tmp_path / "tracks.csv").write_text("track_id,path,split,tags\n" + "".join(
        f"t{n},{root / f's{n}.wav'},train,{cell}\n" for n, cell in enumerate(cells[:3])))
    with caplog.at_level(logging.WARNING, logger="musicssl.data.index"):
        index = TrackIndex.from_csv(tmp_path / "tracks.csv")
    assert [tuple(tags) for tags in index.tracks["tags"]] == [("rock",), (), ()] and index.tag_names == ["rock"]
    assert "1 row(s) hold 'NA' as their tags" in caplog.text


def test_a_split_left_empty_on_a_tiny_set_is_a_warning(caplog):
    ids = [str(i) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        splits = assign_splits(ids, seed=0)
    empty = [name for name in ("train", "valid", "test") if name not in splits.values()]
    assert empty  # 4 tracks rarely fill a 10 % split; with this seed they do not
    assert f"none of the 4 tracks fell in split(s) {empty}" in caplog.text


def test_folder_track_id_with_binary_columns_and_missing_audio(tmp_path, caplog):
    root = tmp_path / "set"
    write_sine(root / "t1.wav")
    write_sine(root / "nested" / "t2.mp3")
    (root / "t4.wav").write_bytes(b"")  # empty file: reported, not indexed
    (root / "annotations.csv").write_text(
        "track_id,guitar,piano,male vocal,split\n"
        "t1,1,0,1,train\n"
        "t2,0,1,0,test\n"
        "t3,1,1,1,train\n"
        "t4,0,0,1,valid\n"
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = load_folder(root)
    base = root.resolve()
    assert_index(
        index,
        ids=["t1", "t2"],
        paths=[base / "t1.wav", base / "nested" / "t2.mp3"],
        splits=["train", "test"],
        tags=[("guitar", "male vocal"), ("piano",)],
        tag_names=["guitar", "piano", "male vocal"],  # column order
        labels=[[1, 0, 1], [0, 1, 0]],
    )
    assert index.extra["missing"] == [
        {"track_id": "t3", "path": str(base / "t3"), "split": "train", "reason": "not found"},
        {"track_id": "t4", "path": str(base / "t4.wav"), "split": "valid", "reason": "empty"},
    ]
    assert "dropped 2 of 4 tracks" in caplog.text
    with pytest.raises(DatasetError, match=r"no audio file found for track\(s\) \['t3'\]"):
        load_folder(root, check_audio=False)


def test_folder_check_audio_off_keeps_listed_paths(tmp_path):
    root = tmp_path / "set"
    write_sine(root / "a.wav")
    (root / "tags.csv").write_text("path,tags\na.wav,x\ngone.wav,y\n")
    index = load_folder(root, check_audio=False, split_fractions=(1.0, 0.0, 0.0))
    assert index.paths == [str(root.resolve() / "a.wav"), str(root.resolve() / "gone.wav")]
    assert index.tracks["split"].tolist() == ["train", "train"]
    assert index.extra["audio_checked"] is False and index.extra["missing"] == []
    kept = load_folder(root, split_fractions=(1.0, 0.0, 0.0))
    assert kept.track_ids == ["a"]
    assert [entry["path"] for entry in kept.extra["missing"]] == [str(root.resolve() / "gone.wav")]
    assert kept.extra["missing"][0]["reason"] == "missing"


def test_folder_nothing_left_after_audio_check(tmp_path):
    root = tmp_path / "set"
    write_sine(root / "unrelated.wav")
    (root / "tags.csv").write_text("path,tags\nx.wav,a\ny.wav,b\n")
    with pytest.raises(DatasetError, match=r"none of the 2 listed audio files .*relative to"):
        load_folder(root)


def test_folder_unlabeled(tmp_path):
    root = tmp_path / "raw"
    for name in ("b.wav", "a.flac", "deep/c.mp3"):
        write_sine(root / name)
    (root / "notes.txt").write_text("not audio")
    with pytest.raises(DatasetError, match=r"no tags file found.*tags_file=PATH, or unlabeled=True"):
        load_folder(root)
    index = load_folder(root, unlabeled=True)
    assert index.track_ids == ["a", "b", "deep/c"]
    assert index.tag_names == [] and index.labels().shape == (3, 0)
    assert sorted(index.tracks["split"]) == ["test", "train", "train"]  # 3 * 0.1 rounds to 0 valid


def test_the_command_lines_train_on_a_folder_without_tags_and_evaluate_only_with_tags(tmp_path):
    from musicssl.data.loaders import open_dataset_option, read_audio_alone

    root = tmp_path / "raw"
    for name in ("b.wav", "a.flac", "deep/c.mp3"):
        write_sine(root / name)
    # Training (self-supervised): every audio file, no tags, marked as such. Before: an error naming
    # Python arguments (tags_file=, unlabeled=True) that no command line has.
    index = open_dataset_option(str(root), allow_unlabeled=True)
    assert index.track_ids == ["a", "b", "deep/c"] and index.tag_names == []
    assert index.extra["unlabeled"] is True and read_audio_alone(index)  # ids and splits from the paths
    # An evaluation needs tags: the error says what to add, in command-line terms.
    with pytest.raises(DatasetError, match=r"no tags file found .*the evaluation needs tags: put a tags CSV/TSV"):
        open_dataset_option(str(root))
    # With a tags file the folder is labelled either way.
    (root / "tags.csv").write_text("path,tags\na.flac,rock\nb.wav,jazz\ndeep/c.mp3,rock\n")
    labelled = open_dataset_option(str(root), allow_unlabeled=True)
    assert labelled.tag_names == ["jazz", "rock"] and "unlabeled" not in labelled.extra


def test_training_reads_a_table_of_tracks_and_splits_without_tags(tmp_path):
    """Before: refused ("no tags ... use a folder without a tags file"), whose tracks then got drawn
    splits instead of the table's."""
    from musicssl.data.loaders import open_dataset_option, read_audio_alone

    for name in ("a.wav", "b.wav", "c.flac"):
        write_sine(tmp_path / "audio" / name)
    write_sine(tmp_path / "audio" / "not-listed.wav")
    (tmp_path / "tracks.csv").write_text("track_id,path,split\nx1,audio/a.wav,train\nx2,audio/b.wav,test\n"
                                         "x3,audio/c.flac,valid\n")
    for spec in (tmp_path, tmp_path / "tracks.csv"):
        index = open_dataset_option(str(spec), allow_unlabeled=True)
        assert index.track_ids == ["x1", "x2", "x3"] and index.tag_names == []
        assert list(index.tracks["split"]) == ["train", "test", "valid"] and index.extra["unlabeled"] is True
        # Without tags, but a table: what a training run records, so an evaluation reads it again as a table.
        assert not read_audio_alone(index)
        assert index.labels().shape == (3, 0)
        # An evaluation needs tags, and says so.
        with pytest.raises(DatasetError, match=r"no tags; .*an evaluation needs tags"):
            open_dataset_option(str(spec))


@pytest.mark.parametrize(("content", "message", "has_header"), [
    (b"track_id,path,split,tags\n", "lists no tracks (a header and no rows); add one row per track", True),
    (b"", "the file is empty; a track index needs a header (track_id,path,split,tags)", False),
    (b'track_id,path,split,tags\n"a,b\n', "not a readable CSV track index (Error tokenizing data", True),
    (b"track_id,path,split,tags\n\xff\xfe\x86,x,train,\n", "not a readable CSV track index ('utf-8' codec", True),
    (b"id,file\na,a.wav\n", "missing column(s) ['track_id', 'path', 'split', 'tags']", False),
    (b"track_id,path,split,tags\na,a.wav,train,rock\nb,,test,jazz\nc, ,test,jazz\n",
     "line 3: empty 'path' (and 1 more); give each track's audio file", True),
    # The same file twice, once by another spelling, in train and in test: test audio would be trained on.
    (b"track_id,path,split,tags\na,audio/x.wav,train,rock\nb,y.wav,train,jazz\nc,audio/../audio/x.wav,test,rock\n",
     "lists the same audio file more than once: ", True),
])
def test_a_broken_track_index_names_the_file_and_the_problem(content, message, has_header, tmp_path):
    # Before: a header-only file said "none of the 0 listed audio files exists (the first was expected
    # at (no tracks listed))", and an empty one pandas' "No columns to parse from file", without its path.
    # A folder's tracks.csv is its index unless it has a tags file's columns (below); a CSV given by path
    # is an index when its header says so (else it is the folder's tags file, for load_folder).
    (tmp_path / "tracks.csv").write_bytes(content)
    for spec in (tmp_path, tmp_path / "tracks.csv") if has_header else (tmp_path,):
        with pytest.raises((DatasetError, TrackIndexError)) as raised:
            open_dataset(str(spec))
        assert message in str(raised.value) and str(tmp_path / "tracks.csv") in str(raised.value)


def test_a_track_index_repeating_a_file_names_it_and_its_lines(tmp_path):
    (tmp_path / "tracks.csv").write_text(
        "track_id,path,split,tags\na,audio/x.wav,train,rock\nb,y.wav,train,jazz\nc,audio/../audio/x.wav,test,rock\n"
    )
    with pytest.raises(TrackIndexError) as raised:
        TrackIndex.from_csv(tmp_path / "tracks.csv")
    assert f"{tmp_path / 'audio' / 'x.wav'} on lines 2, 4; keep one row per file" in str(raised.value)


def test_a_track_index_header_with_spaces_and_a_listed_folder(tmp_path):
    # Before: a header "track_id, path, split, tags" was taken for an index (its names stripped) and then
    # refused by the reader (names not stripped): "missing column(s) ['path', ...] (found [' path', ...])".
    for name in ("a.wav", "b.wav"):
        write_sine(tmp_path / name)
    (tmp_path / "folder.wav").mkdir()
    # With the spaces after the commas in the cells too, and ids that look like numbers (kept as written).
    (tmp_path / "tracks.csv").write_text(
        "track_id, path, split, tags\n001, a.wav, train, rock\n002, b.wav, test, jazz\n003, folder.wav, train, rock\n"
    )
    index = open_dataset(str(tmp_path))
    assert index.track_ids == ["001", "002"] and index.tag_names == ["jazz", "rock"]
    assert list(index.tracks["split"]) == ["train", "test"]
    # A listed folder is reported as one, not as a missing file.
    assert [(entry["track_id"], entry["reason"]) for entry in index.extra["missing"]] == [("003", "a folder")]


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_dataset_is_refused_not_read_as_the_current_folder(spec, tmp_path, monkeypatch):
    from musicssl.data.loaders import open_dataset_option

    # Before: "" was the path ".", and every audio file under the current folder was indexed.
    write_sine(tmp_path / "a.wav")
    monkeypatch.chdir(tmp_path)
    for opener in (open_dataset, lambda text: open_dataset_option(text, allow_unlabeled=True)):
        with pytest.raises(DatasetError, match=r"the dataset given is empty .*give 'corpus', a dataset name"):
            opener(spec)


BAD_TAG_TABLES = [
    (
        "file,label\na.wav,rock\n",
        r"no audio column; found columns \['file', 'label'\], expected an audio column \(path, filename or track_id\)",
    ),
    ("path,filename,tags\na.wav,a.wav,rock\n", r"both 'path' and 'filename' columns.*keep one"),
    ("path,tags,comment\na.wav,rock,nice\n", r"unexpected column\(s\) \['comment'\].*keep_columns=\['comment'\]"),
    ("track_id,guitar,mood\na,1,happy\n", r"column\(s\) 'mood' \(value 'happy' on line 2\) are neither known columns nor 0/1"),
    ("path\na.wav\n", r"no tags; found columns \['path'\].*tags_optional=True \(on the command lines: training reads "
                      r"such a table, its splits kept; an evaluation needs tags\)"),
    ("path,tags,split\na.wav,rock,holdout\n", r"column 'split' has value\(s\) \['holdout'\] \(the first on line 2\); use train, valid or test"),
    ("path,tags\n", r"has a header but no rows"),
    ("path,tags,duration\na.wav,rock,long\n", r"line 2: duration 'long' is not a number of seconds"),
    # Before: "column 'split' has value(s) ['', 'more']" (pandas took the row's first cells for an index).
    ("path,tags,split\na.wav,rock,train,more,x\n",
     r"tags.csv, line 2: 5 comma-separated cells, but the header has 3 \('path', 'tags', 'split'\); quote cells that "
     r"hold a comma \(\"rock,pop\"\), or add the missing column to the header"),
    # Before: accepted, and 1e308 overflowed to an infinite number of samples in the cache's build.
    *[(f"path,tags,duration\na.wav,rock,{bad}\n",
       rf"line 2: duration '{re.escape(bad)}' is not a duration \(seconds, above 0 and at most 1e\+07\); correct it, "
       r"or leave the cell empty if unknown") for bad in ("-5", "0", "inf", "1e308", "-inf")],
]


@pytest.mark.parametrize(("table", "message"), BAD_TAG_TABLES)
def test_folder_bad_tag_tables(tmp_path, table, message):
    root = tmp_path / "set"
    write_sine(root / "a.wav")
    (root / "tags.csv").write_text(table)
    with pytest.raises(DatasetError, match=message):
        load_folder(root)


# Blank and whitespace-only lines (which the table skips) and a quoted cell over two lines all count:
# the error names the line a text editor shows. Before, rows were numbered as if every line held one.
LINE_TABLES = [
    ("path,rock,jazz\na.wav,1,0\n\nb.wav,0,1\n   \nc.wav,1,2\n", r"'jazz' \(value '2' on line 6\)"),
    ("path,rock,split\na.wav,1,train\n\nb.wav,0,test\nc.wav,1,tset\nd.wav,0,tset\n",
     r"has value\(s\) \['tset'\] \(the first on line 5\)"),
    ('path,tags,title\na.wav,rock,"two\nlines"\n\n ,jazz,x\n', r"tags.csv, line 5: empty 'path'"),
    ('path,tags,duration\n"a.wav",rock,"3\n"\n\t\nb.wav,jazz,long\n', r"tags.csv, line 5: duration 'long'"),
]


@pytest.mark.parametrize(("table", "message"), LINE_TABLES)
def test_a_tags_files_errors_name_the_line_as_an_editor_counts_it(tmp_path, table, message):
    root = tmp_path / "set"
    for name in "abcd":
        write_sine(root / f"{name}.wav")
    (root / "tags.csv").write_text(table)
    with pytest.raises(DatasetError, match=message):
        load_folder(root)


def test_blank_lines_in_a_tags_file_leave_its_rows_as_they_were(tmp_path):
    root = tmp_path / "set"
    for name in "abc":
        write_sine(root / f"{name}.wav")
    (root / "tags.csv").write_text("path,tags,split\n\na.wav,rock,train\n  \nb.wav,jazz;pop,test\n\nc.wav,,valid\n\n")
    tracks = load_folder(root).tracks
    assert tracks["track_id"].tolist() == ["a", "b", "c"]
    assert tracks["tags"].tolist() == [("rock",), ("jazz", "pop"), ()]
    assert tracks["split"].tolist() == ["train", "test", "valid"]


def test_folder_keep_columns_and_explicit_tags_file(tmp_path):
    root = tmp_path / "set"
    write_sine(root / "a.wav")
    elsewhere = tmp_path / "meta" / "my_tags.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_text("path,tags,comment\na.wav,rock;pop,nice\n")
    index = load_folder(root, tags_file=elsewhere, keep_columns=["comment"], split_fractions=(0, 0, 1))
    assert index.tracks["comment"].tolist() == ["nice"]
    assert index.tracks["tags"].tolist() == [("rock", "pop")]
    assert index.tracks["split"].tolist() == ["test"]
    assert index.extra["source"] == str(elsewhere)


def test_folder_bad_folders(tmp_path):
    with pytest.raises(DatasetError, match=r"no such folder; pass the folder that holds your audio files"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"the folder is empty; put audio files"):
        load_folder(tmp_path / "empty")
    only_table = tmp_path / "no_audio"
    only_table.mkdir()
    (only_table / "tags.csv").write_text("path,tags\na.wav,rock\n")
    with pytest.raises(DatasetError, match=r"no audio files found .*found 1 other file\(s\) such as \['tags.csv'\]"):
        load_folder(only_table)
    # Given as the tags file (e.g. --data), kept apart from the audio: the fix is where the file is, not root
    # (before: "point root at their folder", and --root is refused for a tags file).
    with pytest.raises(DatasetError, match=re.escape(
            "; the paths tags.csv lists are read relative to the folder it is in: put it in the folder that holds "
            "the audio (with its paths relative to that folder), or list absolute paths")):
        open_dataset(str(only_table / "tags.csv"))
    write_sine(tmp_path / "two" / "x.wav")
    (tmp_path / "two" / "one.csv").write_text("path,tags\nx.wav,a\n")
    (tmp_path / "two" / "other.tsv").write_text("path\ttags\nx.wav\ta\n")
    with pytest.raises(DatasetError, match=r"several CSV/TSV files found .*tags_file="):
        load_folder(tmp_path / "two")
    with pytest.raises(DatasetError, match=r"no such tags file"):
        load_folder(tmp_path / "two", tags_file="absent.csv")


def test_folder_tags_file_with_absolute_paths_to_audio_kept_elsewhere(tmp_path):
    """The tags file's folder need not hold the audio when its paths are absolute (before: refused as
    "no audio files found" in the tags file's folder)."""
    audio = [write_sine(tmp_path / "audio" / name) for name in ("x.wav", "y.flac")]
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "tags.csv").write_text("path,tags\n" + "".join(f"{path.resolve()},rock\n" for path in audio))
    for index in (load_folder(meta), open_dataset(str(meta / "tags.csv")), open_dataset(str(meta))):
        assert index.paths == [str(path.resolve()) for path in audio]
        assert index.tracks["tags"].tolist() == [("rock",), ("rock",)]
    # Relative paths may leave the folder too; a file listed elsewhere that is missing is named.
    (meta / "tags.csv").write_text(f"path,tags\n../audio/x.wav,pop\n{tmp_path / 'audio' / 'gone.wav'},rock\n")
    index = load_folder(meta)
    # The path without its ".." (a file listed twice that way is one file, refused); the id as listed.
    assert index.paths == [str(audio[0].resolve())] and len(index.extra["missing"]) == 1
    assert index.track_ids == ["../audio/x"]
    (meta / "tags.csv").write_text(f"path,tags\n{tmp_path / 'audio' / 'gone.wav'},rock\n")
    with pytest.raises(DatasetError, match=r"none of the 1 listed audio files exists .*expected at .*gone.wav"):
        load_folder(meta)


def test_folder_file_names_match_whatever_their_unicode_normalisation(tmp_path):
    """Names copied from macOS are decomposed (NFD), a tags file typed elsewhere composed (NFC): they
    match, and ids taken from names are NFC, so the drawn split does not depend on where the files
    were copied (an NFC name keeps its id and split)."""
    import unicodedata

    from musicssl.data.loaders import assign_splits

    root = tmp_path / "set"
    names = ["café", "crème brûlée"]
    disk = [write_sine(root / unicodedata.normalize("NFD", f"{name}.wav")) for name in names]
    assert all(unicodedata.normalize("NFD", name) in {p.stem for p in root.iterdir()} for name in names)
    resolved = [str(path.resolve()) for path in disk]
    (root / "tags.csv").write_text("path,tags\n" + "".join(f"{name}.wav,piano\n" for name in names))
    index = load_folder(root, split_fractions=(0.5, 0.0, 0.5))
    assert index.track_ids == names and index.paths == resolved and index.extra["unlisted_audio"] == 0
    drawn = assign_splits(names, (0.5, 0.0, 0.5))
    assert index.tracks["split"].tolist() == [drawn[name] for name in names]
    (root / "tags.csv").write_text("track_id,tags\n" + "".join(f"{name},piano\n" for name in names))
    assert load_folder(root).paths == resolved
    unlabeled = load_folder(root, unlabeled=True, split_fractions=(0.5, 0.0, 0.5))
    assert unlabeled.track_ids == names and unlabeled.tracks["split"].tolist() == index.tracks["split"].tolist()
    # Absolute paths to audio outside the tags file's folder (not scanned) match the same way.
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "tags.csv").write_text("path,tags\n" + "".join(f"{root / name}.wav,piano\n" for name in names))
    outside = load_folder(meta)
    assert outside.paths == resolved and not outside.extra["missing"]


def test_one_file_gives_one_vocabulary_read_as_a_folder_or_as_a_file(tmp_path):
    """A labels.csv with the four columns of a track index and comma-joined tags: read as its folder (a tags
    file) it gave guitar, piano, slow; given as the file (read as a track index, tags joined by ';' only) it
    gave 'guitar,slow' and 'slow,piano' as tags, and a probe scored other tags. A file of those columns under
    another name than tracks.csv now joins its tags as a tags file does, however it is given."""
    root = tmp_path / "set"
    for number in range(3):
        write_sine(root / f"t{number}.wav", frequency=300.0 + 100 * number)
    (root / "labels.csv").write_text('track_id,path,split,tags\n1,t0.wav,train,"guitar,slow"\n2,t1.wav,test,guitar\n'
                                     '3,t2.wav,valid,"slow, piano"\n')
    expected = [("guitar", "slow"), ("guitar",), ("slow", "piano")]
    for index in (open_dataset(str(root)), open_dataset(str(root / "labels.csv"))):
        assert index.tag_names == ["guitar", "piano", "slow"]
        assert [tuple(t) for t in index.tracks["tags"]] == expected


def test_file_identity_does_not_trust_inode_numbers_alone(tmp_path, monkeypatch):
    """Two files that a file system reports with one inode number (0, where it has none; a network share
    spanning several file systems) are two files; real hard links and symbolic links name one."""
    from types import SimpleNamespace

    import musicssl.data.index as index_module
    from musicssl.data.index import file_identity

    first, second = write_sine(tmp_path / "a.wav"), write_sine(tmp_path / "b.wav", frequency=500.0)
    os.link(first, tmp_path / "a-hard.wav")
    os.symlink(first, tmp_path / "a-soft.wav")
    assert file_identity(first) == file_identity(tmp_path / "a-hard.wav") == file_identity(tmp_path / "a-soft.wav")
    assert file_identity(first) != file_identity(second)
    monkeypatch.setattr(index_module.os, "stat", lambda path: SimpleNamespace(st_dev=1, st_ino=0, st_nlink=1))
    assert file_identity(first) != file_identity(second)


def test_a_tag_may_hold_a_comma_and_a_comma_read_inside_a_tag_is_warned_of(tmp_path, caplog):
    """Discogs' genre 'Folk, World, & Country': a tracks.csv joins tags by ';' only, and a tags file whose
    rows join by ';' keeps a cell's ',' inside its tag, as before; where a ',' may have been meant to join
    tags (a cell with a ',' and no ';'), a warning names the line."""
    root = tmp_path / "set"
    for number in range(3):
        write_sine(root / f"t{number}.wav", frequency=300.0 + 100 * number)
    (root / "tags.csv").write_text('path,tags\nt0.wav,"Rock;Folk, World, & Country"\nt1.wav,"rock,guitar"\n'
                                   't2.wav,pop\n')
    with caplog.at_level(logging.WARNING):
        index = open_dataset(str(root))
    assert [tuple(t) for t in index.tracks["tags"]] == [("Rock", "Folk, World, & Country"), ("rock,guitar",), ("pop",)]
    assert (f"{root / 'tags.csv'}: 1 row(s) hold a ',' and no ';' in their tags, each read as one tag (e.g. line 3: "
            "'rock,guitar'), as other rows join their tags with ';'; if a ',' joins tags there, join them with ';'") \
        in caplog.text
    (root / "tags.csv").unlink()
    caplog.clear()
    (root / "tracks.csv").write_text('track_id,path,split,tags\na,t0.wav,train,"Folk, World, & Country"\n'
                                     'b,t1.wav,test,pop\nc,t2.wav,valid,pop\n')
    with caplog.at_level(logging.WARNING):
        index = open_dataset(str(root))
    assert index.tag_names == ["Folk, World, & Country", "pop"]
    assert "each read as one tag (e.g. line 2: 'Folk, World, & Country'), as a tracks.csv joins its tags with ';'" \
        in caplog.text


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="symbolic links")
def test_one_file_under_two_names_is_one_track(tmp_path, caplog):
    """Songs of two genres linked into a second genre's folder. Before: one file, two tracks, drawn into
    splits of their own (some in train and in test). A folder without tags indexes the file once (its first
    name), with a warning; a tags file or a track index that lists it under both names is refused."""
    root = tmp_path / "set"
    for number in range(4):
        write_sine(root / "rock" / f"s{number}.wav", frequency=300.0 + 100 * number)
    (root / "pop").mkdir()
    for number in range(2):
        os.symlink(f"../rock/s{number}.wav", root / "pop" / f"s{number}.wav")
    os.link(root / "rock" / "s3.wav", root / "rock" / "s3-copy.wav")  # a hard link: one file too
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = load_folder(root, unlabeled=True)
    # The name that is no symbolic link is kept; of two hard links (two names, neither a link), the first.
    assert index.track_ids == ["rock/s0", "rock/s1", "rock/s2", "rock/s3-copy"]
    assert ("set: 3 audio file(s) are other names (links) of files already indexed and were left out, e.g. pop/s0.wav "
            "is rock/s0.wav") in caplog.text
    (root / "tags.csv").write_text("path,tags\nrock/s0.wav,rock\nrock/s1.wav,rock\npop/s1.wav,pop\n")
    with pytest.raises(DatasetError, match=re.escape(
            "tags.csv: lists the audio file(s) ['rock/s1.wav and pop/s1.wav'] more than once (under one name, or under "
            "two that name one file, a link); keep one row per file, its tags joined in one cell")):
        load_folder(root)
    (root / "tags.csv").unlink()
    (root / "tracks.csv").write_text("track_id,path,split,tags\na,rock/s0.wav,train,rock\nb,pop/s0.wav,test,pop\n")
    with pytest.raises(TrackIndexError, match=re.escape(f"lists the same audio file more than once: "
                                                        f"{root / 'rock' / 's0.wav'} on lines 2, 3")):
        TrackIndex.from_csv(root / "tracks.csv")


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="file names there are always Unicode")
def test_a_file_whose_name_is_not_utf8_is_left_out_by_name(tmp_path, caplog):
    """A Latin-1 name from an old zip archive (b'caf\\xe9.wav'). Before: the first such file ended the whole
    run ("'utf-8' codec can't encode character '\\udce9'"), naming no file."""
    root = tmp_path / "set"
    for number in range(3):
        write_sine(root / f"t{number}.wav", frequency=300.0 + 100 * number)
    with open(root / "t0.wav", "rb") as source, open(os.path.join(os.fsencode(root), b"caf\xe9.wav"), "wb") as copy:
        copy.write(source.read())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = load_folder(root, unlabeled=True)
    assert index.track_ids == ["t0", "t1", "t2"]
    assert (f"{root.resolve()}: 1 audio file(s) whose names are not UTF-8 were left out, e.g. caf\\xe9.wav; rename them "
            "to UTF-8") in caplog.text
    # A folder of such a name: below the folder read, its files are left out; the folder read itself is refused.
    os.rename(os.path.join(os.fsencode(root), b"caf\xe9.wav"), root / "t9.wav")
    os.mkdir(os.path.join(os.fsencode(root), b"r\xe9cent"))
    os.rename(root / "t9.wav", os.path.join(os.fsencode(root), b"r\xe9cent", b"t9.wav"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_folder(root, unlabeled=True).track_ids == ["t0", "t1", "t2"]
    assert "1 audio file(s) whose names are not UTF-8 were left out, e.g. r\\xe9cent/t9.wav" in caplog.text
    with pytest.raises(DatasetError, match=re.escape("r\\xe9cent: the folder's path is not UTF-8")):
        load_folder(os.fsdecode(os.path.join(os.fsencode(root), b"r\xe9cent")), unlabeled=True)


@pytest.mark.parametrize("header", ["path,rock,pop,rock", "path,rock,pop,rock "])
def test_a_tag_column_named_twice_is_refused(tmp_path, header):
    """Before: pandas renamed the second 'rock' 'rock.1', a tag of its own; with a trailing space the error
    printed a pandas Series."""
    root = tmp_path / "set"
    for number in range(2):
        write_sine(root / f"t{number}.wav")
    (root / "tags.csv").write_text(f"{header}\nt0.wav,1,0,1\nt1.wav,0,1,0\n")
    with pytest.raises(DatasetError, match=re.escape(
            f"{root / 'tags.csv'}: the header names the column 'rock' more than once (columns 2, 4); name each column "
            "once: merge the repeated ones or rename them")):
        load_folder(root)


def test_a_tags_file_that_is_not_utf8_names_the_line_and_the_fix(tmp_path):
    """A spreadsheet's CSV saved in Windows-1252. Before: only "'utf-8' codec can't decode byte 0xe9 in
    position 31"."""
    root = tmp_path / "set"
    for number in range(2):
        write_sine(root / f"t{number}.wav")
    (root / "tags.csv").write_bytes("path,tags\nt0.wav,rock\nt1.wav,café\n".encode("cp1252"))
    with pytest.raises(DatasetError, match=re.escape(
            f"{root / 'tags.csv'}, line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8")):
        load_folder(root)
    # Saved as "Unicode text" (UTF-16 with its byte-order mark): said so, with the conversion that fits it
    # (before: the cp1252 one, which would garble it).
    for encoding in ("utf-16", "utf-16-be"):
        data = "path,tags\nt0.wav,rock\nt1.wav,café\n".encode(encoding)
        (root / "tags.csv").write_bytes(data if data[:2] in (b"\xff\xfe", b"\xfe\xff") else b"\xfe\xff" + data)
        with pytest.raises(DatasetError, match=re.escape(
                f"{root / 'tags.csv'}: is UTF-16 text, not UTF-8; save the file as UTF-8 (a spreadsheet's \"CSV UTF-8\", "
                "or iconv -f utf-16 -t utf-8 FILE > NEW)")):
            load_folder(root)


def test_folder_semicolon_separated_tags_file_and_backslash_paths(tmp_path):
    """A spreadsheet saved as CSV in many locales separates by ';' (before: "no audio column; found
    columns ['path;tags;split']"); Windows paths with '\\' are named as such when no file is found."""
    root = tmp_path / "set"
    write_sine(root / "audio" / "a.wav")
    write_sine(root / "audio" / "b.wav")
    (root / "tags.csv").write_text("path;tags;split\naudio/a.wav;rock,pop;train\naudio/b.wav;jazz;test\n")
    index = load_folder(root)
    assert index.track_ids == ["audio/a", "audio/b"] and index.tracks["split"].tolist() == ["train", "test"]
    assert index.tracks["tags"].tolist() == [("rock", "pop"), ("jazz",)]
    # Such locales write a decimal comma (before: "duration '1,5' is not a number of seconds").
    (root / "tags.csv").write_text("path;tags;duration\naudio/a.wav;rock;1,5\naudio/b.wav;jazz;2\n")
    assert load_folder(root).tracks["duration"].tolist() == [1.5, 2.0]
    # An unknown duration: an empty cell, or "nan" as some tools write it.
    (root / "tags.csv").write_text("path;tags;duration\naudio/a.wav;rock;nan\naudio/b.wav;jazz;\n")
    assert load_folder(root).tracks["duration"].isna().tolist() == [True, True]
    # A trailing separator on some rows (empty cells past the header's) is dropped; before, pandas took
    # the first cells of such rows for an index and shifted the others (path 'rock', tags 'train').
    (root / "tags.csv").write_text("path,tags,split\naudio/a.wav,rock,train,\naudio/b.wav,jazz,test\n")
    index = load_folder(root)
    assert index.track_ids == ["audio/a", "audio/b"] and index.tracks["split"].tolist() == ["train", "test"]
    # Blank lines before the header, as the table skips them; rows numbered first (R's write.table), read without
    # their numbers, as before that check. A single row with one cell too many is not taken for a numbered one.
    # So are rows numbered under an unnamed column (R's write.csv; before: "unexpected column(s) ['Unnamed: 0']").
    for table in ("\n\npath,tags,split\naudio/a.wav,rock,train\naudio/b.wav,jazz,test\n",
                  '"path","tags","split"\n"1","audio/a.wav","rock","train"\n"2","audio/b.wav","jazz","test"\n',
                  '"","path","tags","split"\n"1","audio/a.wav","rock","train"\n"2","audio/b.wav","jazz","test"\n'):
        (root / "tags.csv").write_text(table)
        index = load_folder(root)
        assert index.track_ids == ["audio/a", "audio/b"] and index.tracks["split"].tolist() == ["train", "test"]
    (root / "tags.csv").write_text("path,tags\naudio/a.wav,rock,more\n")
    with pytest.raises(DatasetError, match=r"tags.csv, line 2: 3 comma-separated cells, but the header has 2"):
        load_folder(root)
    # An unnamed first column that does not number the rows 1, 2, ... is no row numbers: refused as before.
    (root / "tags.csv").write_text(',path,tags\n1,audio/a.wav,rock\n3,audio/b.wav,jazz\n')
    with pytest.raises(DatasetError, match=r"unexpected column\(s\) \['Unnamed: 0'\]"):
        load_folder(root)
    (root / "tags.csv").write_text("path,tags\naudio\\a.wav,rock\naudio\\b.wav,jazz\n")
    with pytest.raises(DatasetError, match=r"expected at .*audio\\a.wav\); .*paths must separate folders "
                                           r"with '/', not '\\'"):
        load_folder(root)


def test_a_low_quality_copy_shares_its_twins_split(tmp_path):
    """Before: MTG-Jamendo's 41/241.mp3 and 41/241.low.mp3 in one folder drew a split each, so one song
    could be in train and in test. A .low copy draws its split from the id without .low, whether or not the
    other copy is there (so it keeps its split when that copy comes or goes); other dotted names keep theirs."""
    from musicssl.data.loaders import assign_splits

    root = tmp_path / "jam"
    names = ["41/241", "41/241.low", "07/7", "07/7.low", "12/solo.low", "a.b", "a", "v1.0/song"]
    for name in names:
        write_sine(root / f"{name}.mp3", seconds=0.5)
    (root / "tags.csv").write_text("path,tags\n" + "".join(f"{name}.mp3,x\n" for name in names))
    key = {"41/241": "41/241", "41/241.low": "41/241", "07/7": "07/7", "07/7.low": "07/7", "12/solo.low": "12/solo",
           "a.b": "a.b", "a": "a", "v1.0/song": "v1.0/song"}
    fractions = (0.5, 0.2, 0.3)
    for seed in range(12):
        drawn = assign_splits(sorted(set(key.values())), fractions, seed)
        for index in (load_folder(root, unlabeled=True, split_seed=seed, split_fractions=fractions),
                      load_folder(root, split_seed=seed, split_fractions=fractions)):
            assert dict(zip(index.track_ids, index.tracks["split"])) == {name: drawn[key[name]] for name in names}, seed
    # Without the full-quality copy, the .low one keeps its split.
    (root / "07" / "7.mp3").unlink()
    for seed in range(12):
        alone = load_folder(root, unlabeled=True, split_seed=seed, split_fractions=fractions)
        assert dict(zip(alone.track_ids, alone.tracks["split"]))["07/7.low"] == assign_splits(["07/7"], fractions,
                                                                                              seed)["07/7"]


def test_folder_files_that_differ_only_in_extension_are_two_tracks_and_repeats_are_refused(tmp_path, caplog):
    """Ids from paths drop the extension, except where two files differ only in it (before: the whole
    folder was refused, and without a tags file there was nowhere to add a track_id column)."""
    root = tmp_path / "set"
    write_sine(root / "a.wav")
    write_sine(root / "a.flac")
    write_sine(root / "sub" / "b.wav")
    unlabeled = load_folder(root, unlabeled=True)
    assert dict(zip(unlabeled.track_ids, unlabeled.paths)) == {
        "a.flac": str(root.resolve() / "a.flac"), "a.wav": str(root.resolve() / "a.wav"),
        "sub/b": str(root.resolve() / "sub" / "b.wav")}
    (root / "tags.csv").write_text("path,tags\na.wav,x\na.flac,y\nsub/b.wav,x\n")
    tagged = load_folder(root)
    assert tagged.track_ids == ["a.wav", "a.flac", "sub/b"]
    # The twins share the split drawn for "a": a track keeps its split when its twin comes or goes.
    from musicssl.data.loaders import assign_splits

    for seed in range(20):
        drawn = assign_splits(["a", "sub/b"], (0.7, 0.1, 0.2), seed)
        twins = load_folder(root, split_seed=seed)
        assert dict(zip(twins.track_ids, twins.tracks["split"])) == {
            "a.wav": drawn["a"], "a.flac": drawn["a"], "sub/b": drawn["sub/b"]}
        alone = load_folder(root, unlabeled=True, split_seed=seed)
        assert dict(zip(alone.track_ids, alone.tracks["split"]))["a.flac"] == drawn["a"]
    assert "split_key" not in tagged.tracks
    (root / "tags.csv").write_text("path,tags\na.wav,x\nsub/b.wav,y\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_folder(root).track_ids == ["a", "sub/b"]
    assert "set: 1 audio file(s) under" in caplog.text and "are not in tags.csv and were left out, e.g. ['a.flac']" \
        in caplog.text
    (root / "tags.csv").write_text("path,tags\na.wav,x\nsub/b.wav,y\na.wav,x\n")
    with pytest.raises(DatasetError, match=r"tags.csv: lists the audio file\(s\) \['a.wav'\] more than once \(under one "
                                           r"name, or under two that name one file, a link\); keep one row per file"):
        load_folder(root)
    (root / "tags.csv").write_text("track_id,path,tags\nt1,a.wav,x\nt1,a.flac,y\n")
    with pytest.raises(DatasetError, match=r"track id\(s\) \['t1'\] occur more than once"):
        load_folder(root)


def test_index_paths_decode_to_the_written_audio(tmp_path):
    root = tmp_path / "set"
    write_sine(root / "tone.flac", frequency=1000.0, seconds=0.5)
    (root / "tags.csv").write_text("path,tags,split\ntone.flac,x,train\n")
    audio = load_audio(load_folder(root).paths[0], sample_rate=SAMPLE_RATE)
    spectrum = np.abs(np.fft.rfft(audio))
    assert audio.shape == (8000,)
    assert np.argmax(spectrum) * SAMPLE_RATE / len(audio) == pytest.approx(1000.0, abs=2.0)


# --------------------------------------------------------------------------------------------------
# MagnaTagATune

MTAT_TAGS = ["no voice", "singer", "guitar", "classical", "rock"]
MTAT_ROWS = [  # clip_id, 0/1 per MTAT_TAGS, mp3_path
    ("2", (1, 0, 1, 0, 0), "0/artist_a-album-01-song-0-29.mp3"),
    ("6", (0, 0, 1, 1, 0), "9/artist_b-album-02-song-30-59.mp3"),
    ("10", (0, 1, 0, 0, 0), "a/artist_c-album-03-song-0-29.mp3"),
    ("11", (0, 0, 1, 0, 1), "b/artist_d-album-04-song-0-29.mp3"),
    ("20", (1, 0, 0, 1, 0), "c/artist_e-album-05-song-0-29.mp3"),
    ("30", (0, 0, 0, 0, 1), "d/artist_f-album-06-song-0-29.mp3"),
    ("40", (0, 0, 1, 0, 0), "f/artist_g-album-07-song-0-29.mp3"),
    ("41", (0, 0, 0, 0, 0), "e/artist_h-album-08-song-0-29.mp3"),
]


def write_mtat(folder: Path, tags=MTAT_TAGS, rows=MTAT_ROWS) -> Path:
    """annotations_final.csv as distributed: TAB-separated, every field double-quoted."""
    folder.mkdir(parents=True, exist_ok=True)
    quote = lambda values: "\t".join(f'"{value}"' for value in values)  # noqa: E731
    lines = [quote(["clip_id", *tags, "mp3_path"])]
    lines += [quote([clip_id, *flags, mp3_path]) for clip_id, flags, mp3_path in rows]
    path = folder / "annotations_final.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mtat_top_tags_split_and_dropped_clips(tmp_path, caplog):
    root = tmp_path / "mtat"
    write_mtat(root)
    for _, _, mp3_path in MTAT_ROWS:
        write_sine(root / mp3_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = load_mtat(root, n_tags=3)
    # Said where a command shows it (before: at the INFO level, which none does).
    assert "mtat: left out 3 of 8 clips without any of the top 3 tags (the standard protocol)" in caplog.text
    # Counts: guitar 4; no voice, classical, rock 2 each (column order breaks the tie); singer 1.
    # Clips 10 (singer only), 30 (rock only) and 41 (no tag) have none of the top 3 and are dropped.
    base = root.resolve()
    assert_index(
        index,
        ids=["2", "6", "11", "20", "40"],
        paths=[base / MTAT_ROWS[i][2] for i in (0, 1, 3, 4, 6)],
        splits=["train", "train", "train", "valid", "test"],
        tags=[("guitar", "no voice"), ("guitar", "classical"), ("guitar",), ("no voice", "classical"), ("guitar",)],
        tag_names=["guitar", "no voice", "classical"],
        labels=[[1, 1, 0], [1, 0, 1], [1, 0, 0], [0, 1, 1], [1, 0, 0]],
    )
    assert index.extra["tag_counts"] == {"guitar": 4, "no voice": 2, "classical": 2}
    assert index.extra["dropped_without_tags"] == 3
    assert index.name == "mtat"


def test_mtat_splits_by_the_audio_folders_first_character(tmp_path):
    """Won et al.'s split: folders 0-b train, c valid, d-f test; one kept clip in each of the 16."""
    root = tmp_path / "mtat"
    rows = [(str(number), [1, 0, 0, 0, 0], f"{folder}/clip-{number}.mp3") for number, folder in enumerate("0123456789abcdef")]
    write_mtat(root, rows=rows)
    for _, _, mp3_path in rows:
        write_sine(root / mp3_path)
    index = load_mtat(root, n_tags=1)
    assert index.track_ids == [str(number) for number in range(16)]
    assert index.tracks["split"].tolist() == ["train"] * 12 + ["valid"] + ["test"] * 3


def test_mtat_audio_dir_override_and_missing_report(tmp_path, caplog):
    root = tmp_path / "annotations"
    csv_path = write_mtat(root)
    audio = tmp_path / "mp3"
    for _, _, mp3_path in MTAT_ROWS[:4]:  # clips 20 and 40 have no audio
        write_sine(audio / mp3_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = load_mtat(csv_path, audio_dir=audio, n_tags=3)
    assert index.track_ids == ["2", "6", "11"]
    assert index.paths == [str(audio.resolve() / MTAT_ROWS[i][2]) for i in (0, 1, 3)]
    assert [(m["track_id"], m["split"], m["reason"]) for m in index.extra["missing"]] == [
        ("20", "valid", "missing"), ("40", "test", "missing"),
    ]
    assert index.extra["missing"][0]["path"] == str(audio.resolve() / MTAT_ROWS[4][2])
    assert "dropped 2 of 5 tracks" in caplog.text
    with pytest.raises(DatasetError, match=r"none of the 5 listed audio files.*audio_dir="):
        load_mtat(root, n_tags=3)
    unchecked = load_mtat(root, n_tags=3, check_audio=False)
    assert len(unchecked) == 5 and unchecked.extra["missing"] == []


def test_mtat_default_keeps_the_50_most_frequent_of_52(tmp_path):
    # Tag j is on clips 0 .. counts[j]-1, with counts a permutation of 1..52 (17 is prime to 52).
    counts = [(17 * j) % 52 + 1 for j in range(52)]
    tags = [f"tag{j:02d}" for j in range(52)]
    rows = [(str(i), tuple(int(i < c) for c in counts), f"0/clip{i}.mp3") for i in range(52)]
    write_mtat(tmp_path, tags=tags, rows=rows)
    index = load_mtat(tmp_path, check_audio=False)
    assert len(index.tag_names) == 50
    assert set(tags) - set(index.tag_names) == {"tag00", "tag49"}  # counts 1 and 2 (17 * 49 = 833 = 16 * 52 + 1)
    assert index.tag_names[:3] == ["tag03", "tag06", "tag09"]  # counts 52, 51, 50 (17*3=51, 17*6=102=52+50, ...)
    assert index.labels().sum(axis=0).tolist()[:3] == [52.0, 51.0, 50.0]
    assert len(index) == 52 and set(index.tracks["split"]) == {"train"}


def test_mtat_bad_files(tmp_path):
    with pytest.raises(DatasetError, match=r"annotations_final.csv: not found"):
        load_mtat(tmp_path)
    (tmp_path / "annotations_final.csv").write_text("clip_id,guitar,mp3_path\n2,1,0/a.mp3\n")
    with pytest.raises(DatasetError, match=r"expected TAB-separated columns clip_id, <tag columns>, mp3_path"):
        load_mtat(tmp_path)
    write_mtat(tmp_path, tags=["guitar"], rows=[("2", (2,), "0/a.mp3")])
    with pytest.raises(DatasetError, match=r"tag column 'guitar' has value '2' at clip '2'"):
        load_mtat(tmp_path, n_tags=1)
    write_mtat(tmp_path, tags=["guitar"], rows=[("2", (1,), "g/a.mp3")])
    with pytest.raises(DatasetError, match=r"mp3_path 'g/a.mp3'"):
        load_mtat(tmp_path, n_tags=1)
    # The command lines cannot set n_tags: the message says what the file lacks, not which argument to change.
    with pytest.raises(DatasetError, match=r"has 1 tag column\(s\), fewer than the 50 most frequent tags that the "
                                           r"standard top-50 setup uses; .*188 tag columns: use it \(in Python, "
                                           r"n_tags= 1..1 takes fewer\)"):
        load_mtat(tmp_path)


# --------------------------------------------------------------------------------------------------
# MTG-Jamendo

JAMENDO_HEADER = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS"
JAMENDO_TOP50 = {
    "train": [
        "track_0000214\tartist_000014\talbum_000031\t14/214.mp3\t124.6\tgenre---punkrock",
        "track_0000215\tartist_000014\talbum_000031\t15/215.mp3\t211.1\tgenre---rock\tinstrument---guitar"
        "\tmood/theme---energetic",
    ],
    "validation": [
        "track_0000773\tartist_000104\talbum_000126\t73/773.mp3\t275.3\tgenre---electronic\tinstrument---synthesizer",
    ],
    "test": [
        "track_0001729\tartist_000264\talbum_000252\t29/1729.mp3\t270.2\tgenre---pop\tgenre---rock",
        "track_0002245\tartist_000332\talbum_000362\t45/2245.mp3\t60.1\tmood/theme---relaxing",
    ],
}
JAMENDO_MOOD = {
    "train": ["track_0000948\tartist_000087\talbum_000149\t48/948.mp3\t212.7\tmood/theme---background"],
    "validation": [
        "track_0000950\tartist_000087\talbum_000149\t50/950.mp3\t248.0\tmood/theme---film\tmood/theme---sad",
    ],
    "test": ["track_0001032\tartist_000147\talbum_000171\t32/1032.mp3\t199.9\tmood/theme---happy"],
}


def write_jamendo(root: Path, subset: str, files: dict[str, list[str]], split_id: int = 0) -> None:
    folder = root / "data" / "splits" / f"split-{split_id}"
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in files.items():
        # As distributed: CRLF line endings, a variable number of tag columns.
        with (folder / f"autotagging_{subset}-{split}.tsv").open("w", newline="") as handle:
            handle.write("\r\n".join([JAMENDO_HEADER, *lines]) + "\r\n")


def test_jamendo_top50(tmp_path):
    root = tmp_path / "mtg-jamendo-dataset"
    write_jamendo(root, "top50tags", JAMENDO_TOP50)
    audio = tmp_path / "jamendo_audio"
    relative = ["14/214.mp3", "15/215.mp3", "73/773.mp3", "29/1729.mp3", "45/2245.mp3"]
    for path in relative:
        write_sine(audio / path)
    raw = (root / "data/splits/split-0/autotagging_top50tags-test.tsv").read_bytes()
    assert raw.count(b"\r\n") == 3 and b"\tgenre---pop\tgenre---rock\r\n" in raw

    index = load_jamendo(root, "top50", audio_dir=audio)
    names = [
        "genre---electronic", "genre---pop", "genre---punkrock", "genre---rock",
        "instrument---guitar", "instrument---synthesizer", "mood/theme---energetic", "mood/theme---relaxing",
    ]
    assert_index(
        index,
        ids=["track_0000214", "track_0000215", "track_0000773", "track_0001729", "track_0002245"],
        paths=[audio.resolve() / path for path in relative],
        splits=["train", "train", "valid", "test", "test"],
        tags=[
            ("genre---punkrock",),
            ("genre---rock", "instrument---guitar", "mood/theme---energetic"),
            ("genre---electronic", "instrument---synthesizer"),
            ("genre---pop", "genre---rock"),
            ("mood/theme---relaxing",),
        ],
        tag_names=names,
        labels=[
            [0, 0, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 1, 0],
            [1, 0, 0, 0, 0, 1, 0, 0],
            [0, 1, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 1],
        ],
    )
    assert index.tracks["duration"].tolist() == [124.6, 211.1, 275.3, 270.2, 60.1]
    assert index.tracks["artist_id"].tolist()[2] == "artist_000104"
    assert index.tracks["album_id"].tolist()[4] == "album_000362"
    assert index.tag_groups == {
        "genre": names[:4], "instrument": names[4:6], "mood/theme": names[6:],
    }
    assert index.name == "jamendo-top50-split0"


def test_jamendo_low_quality_missing_and_default_audio_dir(tmp_path, caplog):
    root = tmp_path / "jamendo"
    write_jamendo(root, "moodtheme", JAMENDO_MOOD, split_id=2)
    write_sine(root / "48/948.low.mp3")
    write_sine(root / "32/1032.low.mp3")
    write_sine(root / "50/950.mp3")  # only the full-quality copy: missing when low_quality=True
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = load_jamendo(root, "moodtheme", split_id=2, low_quality=True)
    assert index.track_ids == ["track_0000948", "track_0001032"]
    assert index.paths == [str(root.resolve() / "48/948.low.mp3"), str(root.resolve() / "32/1032.low.mp3")]
    assert index.tracks["split"].tolist() == ["train", "test"]
    assert index.tag_names == ["mood/theme---background", "mood/theme---film", "mood/theme---happy", "mood/theme---sad"]
    assert index.extra["missing"] == [{
        "track_id": "track_0000950",
        "path": str(root.resolve() / "50/950.low.mp3"),
        "split": "valid",
        "reason": "missing",
    }]
    # Named as the -low dataset it read (before: as the one of the full-quality files).
    assert "jamendo-moodtheme-split2-low: dropped 1 of 3 tracks" in caplog.text
    assert index.name == "jamendo-moodtheme-split2"  # the index's own name, as before (its caches' names)
    with pytest.raises(DatasetError, match=r"none of the 3 listed audio files.*--audio-dir \(audio_dir= in Python\).*"
                                           r"the dataset name with -low \(jamendo-top50-low, say; low_quality=True in "
                                           r"Python\)"):
        load_jamendo(root, "moodtheme", split_id=2, audio_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"^jamendo-moodtheme-split2-low: none of the 3 listed audio files"):
        load_jamendo(root, "moodtheme", split_id=2, audio_dir=tmp_path, low_quality=True)


def test_jamendo_splits_by_name_share_one_mel_cache(tmp_path, monkeypatch):
    """``jamendo-mood`` is split 0, ``jamendo-mood-split2`` split 2 (before: no name or flag reached
    the other four splits); every subset and split of the same audio shares one mel cache (before:
    each decoded the whole audio collection again into its own)."""
    from musicssl.data.loaders import check_dataset_option, dataset_name
    from musicssl.data.pipeline import default_mel_cache_dir

    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "cache"))
    root, audio = tmp_path / "jamendo", tmp_path / "audio"
    write_jamendo(root, "moodtheme", JAMENDO_MOOD, split_id=2)
    # Split 0 lists the same tracks with the train and test splits swapped.
    swapped = {"train": JAMENDO_MOOD["test"], "validation": JAMENDO_MOOD["validation"], "test": JAMENDO_MOOD["train"]}
    write_jamendo(root, "moodtheme", swapped, split_id=0)
    write_jamendo(root, "top50tags", JAMENDO_TOP50, split_id=0)
    for path in ("48/948.mp3", "32/1032.mp3", "50/950.mp3", "14/214.mp3", "15/215.mp3", "73/773.mp3", "29/1729.mp3",
                 "45/2245.mp3"):
        write_sine(audio / path)
    assert [dataset_name(spec) for spec in ("jamendo-mood", "Jamendo-Mood-Split2", "jamendo-mood-split", "mtat-split1")] \
        == ["jamendo-mood", "jamendo-mood", None, None]
    split2 = open_dataset_option("jamendo-mood-split2", root, audio)
    split0 = open_dataset_option("jamendo-mood", root, audio)
    assert split2.name == "jamendo-moodtheme-split2" and split2.extra["split_id"] == 2
    assert dict(zip(split2.track_ids, split2.tracks["split"])) == {
        "track_0000948": "train", "track_0000950": "valid", "track_0001032": "test"}
    assert dict(zip(split0.track_ids, split0.tracks["split"])) == {
        "track_0001032": "train", "track_0000950": "valid", "track_0000948": "test"}
    with pytest.raises(DatasetError, match=r"split-4: no such folder; .* holds \['split-0', 'split-2'\]: the dataset "
                                           r"name jamendo-<subset>-splitK reads split-K"):
        open_dataset_option("jamendo-mood-split4", root, audio)
    with pytest.raises(DatasetError, match=r"dataset 'jamendo-mood' needs --root"):
        check_dataset_option("jamendo-mood-split2")
    with pytest.raises(DatasetError, match=r"names split 2, and split_id=1"):
        open_dataset("jamendo-mood-split2", root, audio_dir=audio, split_id=1)
    top50 = open_dataset_option("jamendo-top50", root, audio)
    assert default_mel_cache_dir(split2) == default_mel_cache_dir(split0) == default_mel_cache_dir(top50)
    assert re.fullmatch(r"jamendo-[0-9a-f]{10}", default_mel_cache_dir(split2).name)
    # The .low.mp3 copies are other files under the same track ids: a cache of their own.
    for path in ("48/948.low.mp3", "32/1032.low.mp3", "50/950.low.mp3"):
        write_sine(audio / path)
    low = load_jamendo(root, "moodtheme", split_id=2, audio_dir=audio, low_quality=True)
    assert re.fullmatch(r"jamendo-low-[0-9a-f]{10}", default_mel_cache_dir(low).name)
    # The command lines name them with -low: the same index as low_quality=True.
    named_low = open_dataset_option("jamendo-mood-split2-low", root, audio)
    assert named_low.paths == low.paths and all(path.endswith(".low.mp3") for path in named_low.paths)
    assert default_mel_cache_dir(named_low) == default_mel_cache_dir(low)
    assert open_dataset_option("Jamendo-Mood-Low", root, audio).extra["low_quality"] is True
    assert dataset_name("jamendo-mood-split2-low") == "jamendo-mood" and dataset_name("jamendo-mood-lo") is None
    with pytest.raises(DatasetError, match=r"names the .low.mp3 copies, and low_quality=False"):
        open_dataset("jamendo-mood-low", root, audio_dir=audio, low_quality=False)
    # A cache made under the index's own name before (one per subset and split) is still used, but
    # not by the low-quality copies, whose earlier cache had that same name.
    shared = default_mel_cache_dir(split2)
    earlier = shared.with_name(f"jamendo-moodtheme-split2-{shared.name[len('jamendo-'):]}")
    earlier.mkdir(parents=True)
    assert default_mel_cache_dir(split2) == earlier
    assert re.fullmatch(r"jamendo-low-[0-9a-f]{10}", default_mel_cache_dir(low).name)
    # One spelling per dataset (a search resumed with jamendo-mood-split0 is the one started with jamendo-mood).
    from musicssl.data.loaders import canonical_dataset_spec

    assert [canonical_dataset_spec(spec) for spec in ("Jamendo-Mood-Split0", "jamendo-mood-split2", " MTAT", "./x")] \
        == ["jamendo-mood", "jamendo-mood-split2", "mtat", "./x"]
    assert [canonical_dataset_spec(spec) for spec in ("jamendo-mood-split0-low", "Jamendo-Mood-Split02-LOW")] \
        == ["jamendo-mood-low", "jamendo-mood-split2-low"]


def test_a_root_that_is_a_file_is_refused_also_under_the_home_folder(tmp_path, monkeypatch):
    from musicssl.data.loaders import check_dataset_option

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "afile").write_text("x")
    for spec, what in (("corpus", "where the corpus is or is built"), ("mtat", "the dataset's folder"),
                       ("jamendo-mood-split1", "the dataset's folder")):
        with pytest.raises(DatasetError, match=rf"--root ~/afile is a file; give a folder \({what}\)"):
            check_dataset_option(spec, "~/afile")
    check_dataset_option("mtat", "~/")  # a folder: fine


def test_a_root_inside_the_jamendo_checkout_names_the_checkout(tmp_path):
    """--root given a folder inside the checkout (data/, data/splits/, a split-K folder) names the checkout to give
    instead (before: a path with data/splits/split-0 twice in it, and "split-K folders found there: []")."""
    from musicssl.data.loaders import check_dataset_option

    root = tmp_path / "mtg-jamendo-dataset"
    write_jamendo(root, "top50tags", JAMENDO_TOP50)
    write_jamendo(root, "top50tags", JAMENDO_TOP50, split_id=3)
    checkout = re.escape(str(root.resolve()))
    for inside in ("data", "data/splits", "data/splits/split-0"):
        with pytest.raises(DatasetError, match=rf"^{re.escape(str(root / inside))} is inside the mtg-jamendo-dataset "
                                               rf"checkout {checkout}: pass --root {checkout} \(root= in Python\), the "
                                               r"folder that holds data/splits/$"):
            open_dataset_option("jamendo-top50", root / inside, tmp_path)
    # A split-K folder other than the one the name reads: also the name that reads it.
    with pytest.raises(DatasetError, match=rf"pass --root {checkout} .*data/splits/, and the dataset name "
                                           r"jamendo-<subset>-split3 for the split split-3$"):
        open_dataset_option("jamendo-top50", root / "data/splits/split-3", tmp_path)
    # No checkout above it: what the folder lacks.
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DatasetError, match=r"elsewhere: no data/splits/ folder there; pass --root \(root= in Python\) "
                                           r"the mtg-jamendo-dataset checkout, the folder that holds data/splits/split-0/"):
        open_dataset_option("jamendo-top50", tmp_path / "elsewhere", tmp_path)
    # --audio-dir given a file (before: "none of the 5 listed audio files exists", each path under the file).
    (tmp_path / "one.mp3").write_bytes(b"x")
    for name in ("jamendo-top50", "mtat", "msd"):
        with pytest.raises(DatasetError, match=rf"^--audio-dir {re.escape(str(tmp_path / 'one.mp3'))} is a file; give "
                                               r"the folder that holds the dataset's audio$"):
            check_dataset_option(name, root, tmp_path / "one.mp3")


def test_jamendo_bad_inputs(tmp_path):
    root = tmp_path / "jamendo"
    write_jamendo(root, "top50tags", JAMENDO_TOP50)
    subsets = r"\['genre', 'instrument', 'moodtheme', 'top50'\]"
    with pytest.raises(DatasetError, match=r"unknown MTG-Jamendo subset 'mood'; use one of " + subsets):
        load_jamendo(root, "mood")
    with pytest.raises(DatasetError, match=r"split-3: no such folder; .* holds \['split-0'\]: the dataset name "
                                           r"jamendo-<subset>-splitK reads split-K"):
        load_jamendo(root, split_id=3)
    with pytest.raises(DatasetError, match=r"autotagging_genre-train.tsv: not found.*autotagging_top50tags-test.tsv"):
        load_jamendo(root, "genre")
    bad = root / "data/splits/split-0/autotagging_top50tags-train.tsv"
    bad.write_text("TRACK_ID,ARTIST_ID,ALBUM_ID,PATH,DURATION,TAGS\r\n")
    with pytest.raises(DatasetError, match=r"is not the MTG-Jamendo header"):
        load_jamendo(root, check_audio=False)
    bad.write_text(JAMENDO_HEADER + "\r\ntrack_1\tartist_1\talbum_1\t01/1.mp3\tlong\tgenre---pop\r\n")
    with pytest.raises(DatasetError, match=r"line 2: DURATION 'long' is not a number"):
        load_jamendo(root, check_audio=False)
    # A byte-order mark (as some editors save) is not part of the header.
    bad.write_text("\ufeff" + JAMENDO_HEADER + "\r\n" + JAMENDO_TOP50["train"][0] + "\r\n", encoding="utf-8")
    assert len(load_jamendo(root, check_audio=False)) > 1
    # A track in two splits (train and test) is an error, not a silent duplicate; it names both places.
    bad.write_text(JAMENDO_HEADER + "\r\n" + JAMENDO_TOP50["test"][0] + "\r\n")
    with pytest.raises(DatasetError, match=r"autotagging_top50tags-test.tsv, line 2: TRACK_ID 'track_0001729' is "
                                           r"listed already at autotagging_top50tags-train.tsv, line 2, in split "
                                           r"'train' there and 'test' here, which would put one track in two splits"):
        load_jamendo(root, check_audio=False)
    # Twice in one file: where, and nothing about splits.
    bad.write_text(JAMENDO_HEADER + "\r\n" + JAMENDO_TOP50["train"][0] + "\r\n" + JAMENDO_TOP50["train"][0] + "\r\n")
    with pytest.raises(DatasetError, match=r"autotagging_top50tags-train.tsv, line 3: TRACK_ID '.*' is listed already "
                                           r"at autotagging_top50tags-train.tsv, line 2; the dataset's split files"):
        load_jamendo(root, check_audio=False)
    # Not UTF-8 (before: a bare UnicodeDecodeError, which downstream printed as a traceback): the file is named.
    bad.write_bytes((JAMENDO_HEADER + "\r\n" + JAMENDO_TOP50["train"][0] + "\r\n").encode()
                    + b"track_9\tartist_9\talbum_9\t09/9.mp3\t8.0\tgenre---caf\xe9\r\n")
    with pytest.raises(DatasetError, match=r"autotagging_top50tags-train.tsv: not UTF-8 text \(.*can't decode byte "
                                           r"0xe9.*\); MTG-Jamendo's split files are UTF-8"):
        load_jamendo(root, check_audio=False)


# --------------------------------------------------------------------------------------------------
# Million Song Dataset

MSD_TAGS = ["rock", "Hip-Hop", "female vocalists", "Mellow"]
MSD_TRAIN = ["TRAAAAV128F421A322", "TRAAABD128F429CF47", "TRBCDEF128F1234567", "TRZZYXW12903CD1234"]
MSD_TEST = ["TRQWERT128F9876543"]
MSD_VECTORS = {
    "TRAAAAV128F421A322": [1, 0, 0, 1],
    "TRAAABD128F429CF47": [0, 1, 0, 0],
    "TRBCDEF128F1234567": [1, 0, 1, 0],
    "TRZZYXW12903CD1234": [0, 0, 0, 1],
    "TRQWERT128F9876543": [1, 1, 1, 0],
}


def python2_id_list_pickle(ids: list[str]) -> bytes:
    """What Python 2's cPickle.dump(list_of_str, f) wrote (protocol 0), as in filtered_list_test.cP."""
    items = "".join(f"S'{msd_id}'\np{n + 2}\na" for n, msd_id in enumerate(ids))
    return ("(lp1\n" + items + ".").encode("ascii")


def python2_vector_dict_pickle(vectors: dict[str, list[int]]) -> bytes:
    """Python 2 protocol-0 pickle of {str: numpy int64 array of shape (n, 1)} (numpy.core names, S'' strings)."""
    parts = ["(dp0\n"]
    for msd_id, values in vectors.items():
        data = "".join(f"\\x{byte:02x}" for byte in np.asarray(values, dtype="<i8").tobytes())
        parts.append(
            f"S'{msd_id}'\ncnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntS'b'\ntR"
            f"(I1\n(I{len(values)}\nI1\ntcnumpy\ndtype\n(S'i8'\nI0\nI1\ntR(I3\nS'<'\nNNNI-1\nI-1\nI0\ntb"
            f"I00\nS'{data}'\ntbs"
        )
    return ("".join(parts) + ".").encode("ascii")


def write_msd(folder: Path, python2: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "50tagList.txt").write_text("\n".join(MSD_TAGS) + "\n")
    (folder / "filtered_list_train.cP").write_bytes(pickle.dumps(list(MSD_TRAIN), protocol=2))
    if python2:
        (folder / "filtered_list_test.cP").write_bytes(python2_id_list_pickle(MSD_TEST))
        (folder / "msd_id_to_tag_vector.cP").write_bytes(python2_vector_dict_pickle(MSD_VECTORS))
    else:
        (folder / "filtered_list_test.cP").write_bytes(pickle.dumps(list(MSD_TEST)))
        vectors = {key: np.asarray(value, dtype=np.int64).reshape(-1, 1) for key, value in MSD_VECTORS.items()}
        (folder / "msd_id_to_tag_vector.cP").write_bytes(pickle.dumps(vectors, protocol=5))


MSD_EXPECTED_PATHS = [
    "A/A/A/TRAAAAV128F421A322.mp3", "A/A/A/TRAAABD128F429CF47.mp3", "B/C/D/TRBCDEF128F1234567.mp3",
    "Z/Z/Y/TRZZYXW12903CD1234.mp3", "Q/W/E/TRQWERT128F9876543.mp3",
]


@pytest.mark.parametrize("python2", [False, True], ids=["python3-pickles", "python2-pickles"])
def test_msd(tmp_path, python2):
    split_dir = tmp_path / "split" / "msd"
    write_msd(split_dir, python2=python2)
    if python2:
        assert (split_dir / "filtered_list_test.cP").read_bytes().startswith(b"(lp1\nS'TRQWERT128F9876543'\np2\na")
    audio = tmp_path / "msd_audio"
    for relative in MSD_EXPECTED_PATHS:
        write_sine(audio / relative)
    index = load_msd(split_dir, audio, train_size=3)
    assert_index(
        index,
        ids=MSD_TRAIN + MSD_TEST,
        paths=[audio.resolve() / relative for relative in MSD_EXPECTED_PATHS],
        splits=["train", "train", "train", "valid", "test"],
        tags=[("rock", "Mellow"), ("Hip-Hop",), ("rock", "female vocalists"), ("Mellow",),
              ("rock", "Hip-Hop", "female vocalists")],
        tag_names=MSD_TAGS,
        labels=[[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]],
    )
    assert index.name == "msd" and index.extra["train_size"] == 3


def test_msd_path_pattern_missing_audio_and_train_size(tmp_path):
    split_dir = tmp_path / "msd"
    write_msd(split_dir)
    audio = tmp_path / "flat"
    for msd_id in MSD_TRAIN[:2]:
        write_sine(audio / f"{msd_id}.clip.mp3")
    index = load_msd(split_dir, audio, train_size=3, path_pattern="{id}.clip.mp3")
    assert index.track_ids == MSD_TRAIN[:2]
    assert index.paths == [str(audio.resolve() / f"{msd_id}.clip.mp3") for msd_id in MSD_TRAIN[:2]]
    assert [entry["track_id"] for entry in index.extra["missing"]] == MSD_TRAIN[2:] + MSD_TEST
    with pytest.raises(DatasetError, match=r"has 4 ids, too few for the 201,680 training ids of Won et al.'s split.*"
                                           r"213,454 ids: use it \(in Python, train_size= 1..4 takes fewer\)"):
        load_msd(split_dir, audio)
    with pytest.raises(DatasetError, match=r"path_pattern '\{msd_id\}.mp3' is not usable"):
        load_msd(split_dir, audio, train_size=3, path_pattern="{msd_id}.mp3")
    with pytest.raises(DatasetError, match=r"none of the 5 listed audio files.*laid out as"):
        load_msd(split_dir, tmp_path / "nothing_here", train_size=3)


def test_msd_7digital_clips_are_found_through_the_split_folders_dictionaries(tmp_path):
    """Won et al.'s split folder maps MSD id -> 7digital id -> clip path (e.g. 8/9/8947470.clip.mp3);
    Python 2 pickles, as distributed: ids as str, 7digital ids as int."""
    split_dir = tmp_path / "msd"
    write_msd(split_dir)
    ids = MSD_TRAIN + MSD_TEST
    seven = {msd_id: 8947470 + 11 * n for n, msd_id in enumerate(ids[:-1])}  # the last id has no clip
    relative = {number: f"{str(number)[0]}/{str(number)[1]}/{number}.clip.mp3" for number in seven.values()}
    (split_dir / "MSD_id_to_7D_id.pkl").write_bytes(pickle.dumps(seven, protocol=0))
    (split_dir / "7D_id_to_path.pkl").write_bytes(pickle.dumps(relative, protocol=0))
    audio = tmp_path / "7digital"
    for msd_id in ids[:3]:
        write_sine(audio / relative[seven[msd_id]])
    index = load_msd(split_dir, audio, train_size=3)  # the default finds the layout
    assert index.extra["audio_layout"] == "7digital"
    assert index.track_ids == ids[:3]
    assert index.paths[0] == str(audio.resolve() / "8" / "9" / "8947470.clip.mp3")
    missing = {entry["track_id"]: entry for entry in index.extra["missing"]}
    assert set(missing) == set(ids[3:]) and missing[ids[-1]]["reason"] == "missing"
    assert missing[ids[-1]]["path"].endswith(f"(no 7digital clip for {ids[-1]})")
    # MSD's own layout wins where it finds more files; the 7digital one is asked for by name.
    own = tmp_path / "own"
    for path in MSD_EXPECTED_PATHS[:4]:
        write_sine(own / path)
    assert load_msd(split_dir, own, train_size=3).extra["audio_layout"] == "{id[2]}/{id[3]}/{id[4]}/{id}.mp3"
    with pytest.raises(DatasetError, match="none of the 5 listed audio files"):
        load_msd(split_dir, own, train_size=3, path_pattern="7digital")
    # Without the two dictionaries: a clear error when asked for, and the hint names them.
    for name in ("MSD_id_to_7D_id.pkl", "7D_id_to_path.pkl"):
        (split_dir / name).unlink()
    with pytest.raises(DatasetError, match=r"the 7digital layout needs \['MSD_id_to_7D_id.pkl', '7D_id_to_path.pkl'\]"):
        load_msd(split_dir, audio, train_size=3, path_pattern="7digital")
    with pytest.raises(DatasetError, match=r"laid out as .*the 7digital layout \(8/9/8947470.clip.mp3\) needs"):
        load_msd(split_dir, audio, train_size=3)


def test_msd_layout_is_decided_by_files_anywhere_in_the_lists_not_only_the_first(tmp_path):
    """Audio for a few tracks spread over the lists (none of the first 100): the layout that finds them
    wins, and when neither finds any file the error says so over every listed track."""
    split_dir = tmp_path / "msd"
    ids = [f"TR{n:016d}" for n in range(3000)]
    split_dir.mkdir()
    (split_dir / "50tagList.txt").write_text("\n".join(MSD_TAGS) + "\n")
    (split_dir / "filtered_list_train.cP").write_bytes(pickle.dumps(ids[:2500]))
    (split_dir / "filtered_list_test.cP").write_bytes(pickle.dumps(ids[2500:]))
    vectors = {msd_id: np.asarray([1, 0, 0, 0]) for msd_id in ids}
    (split_dir / "msd_id_to_tag_vector.cP").write_bytes(pickle.dumps(vectors))
    seven = {msd_id: 8000000 + n for n, msd_id in enumerate(ids)}
    (split_dir / "MSD_id_to_7D_id.pkl").write_bytes(pickle.dumps(seven))
    (split_dir / "7D_id_to_path.pkl").write_bytes(
        pickle.dumps({number: f"8/{number % 10}/{number}.clip.mp3" for number in seven.values()}))
    audio = tmp_path / "7digital"
    present = [ids[1234], ids[2777]]
    for msd_id in present:
        number = seven[msd_id]
        write_sine(audio / "8" / str(number % 10) / f"{number}.clip.mp3")
    index = load_msd(split_dir, audio, train_size=2000)
    assert index.extra["audio_layout"] == "7digital" and index.track_ids == present
    with pytest.raises(DatasetError) as raised:
        load_msd(split_dir, tmp_path / "nothing_here", train_size=2000)
    assert "the 7digital layout found any of the 3000 listed tracks' files" in str(raised.value)


class _Hostile:
    """Unpickling this would delete the canary file."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self):
        return (os.remove, (self.canary,))


def test_msd_refuses_pickles_that_would_run_code(tmp_path):
    split_dir = tmp_path / "msd"
    write_msd(split_dir)
    canary = tmp_path / "canary"
    canary.write_text("still here")
    (split_dir / "filtered_list_train.cP").write_bytes(pickle.dumps([_Hostile(canary)]))
    with pytest.raises(DatasetError, match=r"refusing to load global '(posix|nt).remove'.*could run code"):
        load_msd(split_dir, tmp_path, train_size=1)
    assert canary.read_text() == "still here"


def test_msd_bad_files(tmp_path):
    split_dir = tmp_path / "msd"
    write_msd(split_dir)
    (split_dir / "msd_id_to_tag_vector.cP").unlink()
    with pytest.raises(DatasetError, match=r"missing \['msd_id_to_tag_vector.cP'\]"):
        load_msd(split_dir, tmp_path)
    vectors = {key: np.asarray(value[:3]) for key, value in MSD_VECTORS.items()}
    (split_dir / "msd_id_to_tag_vector.cP").write_bytes(pickle.dumps(vectors))
    with pytest.raises(DatasetError, match=r"has 3 entries but 50tagList.txt lists 4 tags"):
        load_msd(split_dir, tmp_path, train_size=3)
    partial = {key: np.asarray(value) for key, value in list(MSD_VECTORS.items())[:-1]}
    (split_dir / "msd_id_to_tag_vector.cP").write_bytes(pickle.dumps(partial))
    with pytest.raises(DatasetError, match=r"no tag vector for 1 listed id\(s\), e.g. \['TRQWERT128F9876543'\]"):
        load_msd(split_dir, tmp_path, train_size=3)
    (split_dir / "50tagList.txt").write_bytes(b"rock\n\xe9lectro\n")
    with pytest.raises(DatasetError, match=r"50tagList.txt: not UTF-8 text \(.*0xe9.*\); it should list one tag name"):
        load_msd(split_dir, tmp_path, train_size=3)


# --------------------------------------------------------------------------------------------------
# open_dataset


def test_open_dataset_by_name(tmp_path):
    mtat_root = tmp_path / "mtat"
    write_mtat(mtat_root)
    assert open_dataset("MTAT", mtat_root, n_tags=3, check_audio=False).track_ids == ["2", "6", "11", "20", "40"]

    jamendo_root = tmp_path / "jamendo"
    write_jamendo(jamendo_root, "moodtheme", JAMENDO_MOOD)
    mood = open_dataset("jamendo-mood", jamendo_root, check_audio=False)
    assert mood.track_ids == ["track_0000948", "track_0000950", "track_0001032"]
    assert mood.extra["subset"] == "moodtheme"

    msd_dir = tmp_path / "msd"
    write_msd(msd_dir)
    msd = open_dataset("msd", msd_dir, audio_dir=tmp_path / "audio", train_size=3, check_audio=False)
    assert msd.paths[0] == str((tmp_path / "audio").resolve() / MSD_EXPECTED_PATHS[0])
    with pytest.raises(DatasetError, match=r"'msd' needs audio_dir="):
        open_dataset("msd", msd_dir)
    with pytest.raises(DatasetError, match=r"'jamendo-genre' needs root="):
        open_dataset("jamendo-genre")


def test_open_dataset_by_path(tmp_path, monkeypatch):
    root = tmp_path / "set"
    write_sine(root / "a.wav")
    write_sine(root / "b.wav")
    (root / "tags.csv").write_text("path,tags,split\na.wav,rock,train\nb.wav,pop;rock,test\n")
    from_folder = open_dataset(str(root))
    assert from_folder.track_ids == ["a", "b"]
    from_tags_file = open_dataset(str(root / "tags.csv"))
    assert from_tags_file.track_ids == ["a", "b"]

    # A folder with a tracks.csv is read from it; relative paths resolve against the file's folder.
    from_folder.to_csv(root / "tracks.csv")
    (root / "a.wav").unlink()
    reread = open_dataset(str(root))
    assert reread.track_ids == ["b"]
    assert reread.paths == [str(root.resolve() / "b.wav")]
    assert reread.tracks["tags"].tolist() == [("pop", "rock")]
    assert [entry["track_id"] for entry in reread.extra["missing"]] == ["a"]
    unchecked = open_dataset(str(root / "tracks.csv"), check_audio=False)
    assert unchecked.track_ids == ["a", "b"]
    assert unchecked.tracks["split"].tolist() == ["train", "test"]

    # A path from the home folder, "~/...", is the user's (before: a folder named "~" next to tracks.csv).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_sine(tmp_path / "home" / "music" / "c.wav")
    (root / "tracks.csv").write_text("track_id,path,split,tags\nb,b.wav,train,rock\nc,~/music/c.wav,test,pop\n")
    home = open_dataset(str(root / "tracks.csv"))
    assert home.paths == [str(root.resolve() / "b.wav"), str(tmp_path / "home" / "music" / "c.wav")]
    assert home.track_ids == ["b", "c"]


def test_open_dataset_unknown_name(tmp_path):
    with pytest.raises(DatasetError) as caught:
        open_dataset("magnatagatune", tmp_path)
    message = str(caught.value)
    for name in ("corpus", "mtat", "jamendo-top50", "jamendo-instrument", "jamendo-mood", "jamendo-genre", "msd"):
        assert f"'{name}'" in message
    assert "no file or folder of that name exists" in message



def test_folder_audio_behind_a_symbolic_link_is_found(tmp_path):
    """Audio linked into a dataset's folder (common on shared machines) is found (before: ``rglob`` did not
    follow the link, and the folder had "no audio files"); a link back up the tree is walked once."""
    source = tmp_path / "store"
    audio = [write_sine(source / name) for name in ("a.wav", "b.flac")]
    root = tmp_path / "set"
    root.mkdir()
    (root / "audio").symlink_to(source, target_is_directory=True)
    (source / "loop").symlink_to(root, target_is_directory=True)  # set/audio/loop -> set: a cycle
    unlabeled = open_dataset_option(str(root), allow_unlabeled=True)
    assert unlabeled.track_ids == ["audio/a", "audio/b"]
    assert unlabeled.paths == [str(root.resolve() / "audio" / name) for name in ("a.wav", "b.flac")]
    (root / "tags.csv").write_text("track_id,tags\na,rock\nb,jazz\n")
    labelled = load_folder(root)
    assert labelled.track_ids == ["a", "b"] and [Path(p).resolve() for p in labelled.paths] == audio


def test_folder_tags_file_cells_as_a_user_writes_them(tmp_path):
    """Paths through "..", names with surrounding spaces, a NUL byte, and a track_id that names two files."""
    root = tmp_path / "set"
    for name in ("audio/a.wav", "audio/b.wav", "  spaced.wav", "twin.wav", "twin.flac"):
        write_sine(root / name)
    # One file listed twice, once through "..": refused, as a file listed twice is (before: two tracks,
    # one in train and one in test).
    (root / "tags.csv").write_text("path,tags,split\naudio/a.wav,x,train\naudio/../audio/a.wav,x,test\n")
    with pytest.raises(DatasetError, match=r"lists the audio file\(s\) \['audio/a.wav'\] more than once"):
        load_folder(root)
    (root / "tags.csv").write_text("path,tags\naudio/../audio/b.wav,x\n")
    assert load_folder(root).track_ids == ["audio/b"]
    # Spaces around a cell are dropped, unless the file's own name has them (before: "no such file").
    (root / "tags.csv").write_text('path,tags\n"  spaced.wav",x\n audio/a.wav ,y\n')
    index = load_folder(root)
    assert index.track_ids == ["  spaced", "audio/a"]
    assert index.paths == [str(root.resolve() / "  spaced.wav"), str(root.resolve() / "audio" / "a.wav")]
    # A NUL byte names its line (before: "embedded null byte", no file, no line).
    (root / "tags.csv").write_bytes(b"path,tags\naudio/a.wav,x\naudio/b\x00.wav,y\n")
    with pytest.raises(DatasetError, match=r"tags.csv, line 3: the 'path' cell contains a NUL byte"):
        load_folder(root)
    # A track_id that names two files (other extensions) is refused like one that names two files by name
    # (before: twin.flac was taken without a word).
    (root / "tags.csv").write_text("track_id,tags\ntwin,x\naudio/a,y\n")
    with pytest.raises(DatasetError, match=r"line 2: track_id 'twin' matches several audio files"):
        load_folder(root)


def test_a_folders_tracks_csv_with_a_tags_files_columns_is_its_tags_file(tmp_path):
    """The README: a folder's only CSV is its tags file, also when it is named tracks.csv (before: refused for
    lacking track_id); one with the four columns of an index stays an index."""
    root = tmp_path / "set"
    for name in ("a.wav", "b.wav"):
        write_sine(root / name)
    (root / "tracks.csv").write_text("path,tags,split\na.wav,rock,train\nb.wav,jazz,test\n")
    index = open_dataset(str(root))
    assert index.track_ids == ["a", "b"] and index.tracks["split"].tolist() == ["train", "test"]
    assert index.extra["source"] == str(root.resolve() / "tracks.csv")
    assert open_dataset_option(str(root)).track_ids == ["a", "b"]
    # An index: tags stripped and deduplicated (before: " guitar" and "guitar" were two tags), split names
    # as a tags file takes them (before: refused).
    (root / "tracks.csv").write_text(
        "track_id,path,split,tags\nx,a.wav,Validation,rock; guitar;rock\ny,b.wav,TEST, guitar\n"
    )
    index = open_dataset(str(root))
    assert index.tag_names == ["guitar", "rock"] and index.tracks["tags"].tolist() == [("rock", "guitar"), ("guitar",)]
    assert index.tracks["split"].tolist() == ["valid", "test"]


def test_a_tags_file_in_another_format_is_named_not_ignored(tmp_path):
    """A folder whose tags are in labels.txt was used without tags, and its splits ignored (its test tracks
    trained on); now it is refused with the file's name and the fix."""
    root = tmp_path / "set"
    write_sine(root / "a.wav")
    (root / "labels.txt").write_text("path,tags,split\na.wav,rock,test\n")
    for allow_unlabeled in (True, False):
        with pytest.raises(DatasetError, match=r"labels.txt looks like a tags file, but only .csv and .tsv .*"
                                               r"rename it \(e.g. to labels.csv"):
            open_dataset_option(str(root), allow_unlabeled=allow_unlabeled)
    (root / "labels.txt").rename(root / "labels.csv")
    assert open_dataset_option(str(root)).tracks["split"].tolist() == ["test"]
    # Files so named that are no tables of tags do not stop a folder of audio without tags.
    (root / "labels.csv").unlink()
    write_sine(root / "metadata.wav")
    (root / "metadata.json").write_text("{}")
    assert open_dataset_option(str(root), allow_unlabeled=True).track_ids == ["a", "metadata"]


def test_a_named_datasets_folder_or_file_given_as_a_path_says_to_open_it_by_name(tmp_path):
    """Before: MTG-Jamendo's checkout trained as a folder without tags (a song's .mp3 and .low.mp3 two
    tracks, in different splits), MagnaTagATune's folder failed on its tags file's columns (all 190
    listed), MSD's split folder said it found no audio, and a wav or pickle file was read as a CSV."""
    from musicssl.data.loaders import open_dataset_option

    jamendo = tmp_path / "mtg-jamendo-dataset"
    write_jamendo(jamendo, "top50tags", JAMENDO_TOP50)
    for name in ("14/214.mp3", "14/214.low.mp3", "15/215.mp3"):
        write_sine(jamendo / name)
    mtat = tmp_path / "mtat"
    write_mtat(mtat)
    write_sine(mtat / "0" / "clip.mp3")
    msd = tmp_path / "msd"
    write_msd(msd)
    cases = [
        (jamendo, rf"{jamendo} looks like a checkout of the mtg-jamendo-dataset repository \(data/splits/\): open "
                  rf"it by name, jamendo-top50 .* with --root {jamendo}$"),
        (mtat, rf"{mtat} holds MagnaTagATune \(annotations_final.csv\): open it by name, mtat, with --root {mtat}$"),
        (mtat / "annotations_final.csv", rf"is MagnaTagATune's tags file: open the dataset by name, mtat, with --root "
                                         rf"{mtat}$"),
        (msd, rf"{msd} holds the Million Song Dataset's split files \(filtered_list_train.cP ...\): open it by name, "
              rf"msd, with --root {msd} and --audio-dir"),
        (msd / "filtered_list_train.cP", r"is one of the Million Song Dataset's split files: open the dataset by name"),
        (jamendo / "14" / "214.mp3", r"214.mp3 is an audio file; give the folder of audio that holds it, a tracks.csv"),
        (msd / "50tagList.txt", r"is one of the Million Song Dataset's split files"),
        (jamendo / "data/splits/split-0/autotagging_top50tags-train.tsv",
         rf"is one of MTG-Jamendo's split files: open it by name, jamendo-top50 .* with --root {jamendo}$"),
        (jamendo / "data/splits/split-0", rf"split-0 holds MTG-Jamendo's split files: .* with --root {jamendo}$"),
    ]
    notes = tmp_path / "notes.json"
    notes.write_text('{"a": 1}\n')
    cases.append((notes, r"notes.json: not a table of tracks or tags \(read from .csv, .tsv, .tab, .txt files\)"))
    for spec, message in cases:
        for unlabeled in (True, False):
            with pytest.raises(DatasetError, match=message):
                open_dataset_option(str(spec), allow_unlabeled=unlabeled)
    # A tags file or a track index of the user's own in such a folder: the folder is read as they made it,
    # whatever the tags file's name (a folder's only CSV/TSV is its tags file).
    (jamendo / "mytags.csv").write_text("path,tags,split\n14/214.mp3,rock,train\n15/215.mp3,pop,test\n")
    index = open_dataset_option(str(jamendo))
    assert index.track_ids == ["14/214", "15/215"] and index.tag_names == ["pop", "rock"]
    # A folder of the user's own with a data/splits folder that is not MTG-Jamendo's, and tags given as a .tab.
    project = tmp_path / "project"
    for name in ("a.wav", "b.wav"):
        write_sine(project / name)
    (project / "data" / "splits").mkdir(parents=True)
    assert open_dataset_option(str(project), allow_unlabeled=True).track_ids == ["a", "b"]
    (project / "my.tab").write_text("path\ttags\tsplit\na.wav\trock\ttrain\nb.wav\tpop\ttest\n")
    assert open_dataset_option(str(project / "my.tab")).tag_names == ["pop", "rock"]
