"""Disk room helpers of musicssl.paths: sizes for people, free room, and what counts as a full disk."""

from __future__ import annotations

import errno
import shutil

import pytest

from musicssl.paths import disk_full, free_bytes, same_file_system, size_text


@pytest.mark.parametrize("size, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (21_000, "21.0 kB"),
                                        (135_000_000, "135 MB"), (2_400_000_000, "2.4 GB"),
                                        (635_500_000_000_000, "636 TB"), (2 * 10**16, "20000 TB"),
                                        (99_940, "99.9 kB"), (99_960, "100 kB"), (999_499, "999 kB"),
                                        (999_999, "1.0 MB"), (999.6e9, "1.0 TB")])
def test_sizes_are_written_in_powers_of_1000_with_three_figures_at_most(size, text):
    assert size_text(size) == text


def test_free_room_is_read_on_the_nearest_folder_that_exists(tmp_path):
    free = free_bytes(tmp_path / "not" / "made" / "yet")
    assert free == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.01)
    assert not (tmp_path / "not").exists()


def test_a_full_disk_is_told_by_its_error_also_through_the_errors_it_caused(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full(full) and disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise full
        except OSError as error:
            raise RuntimeError("System error.") from error
    except RuntimeError as wrapped:
        assert disk_full(wrapped)
    assert not disk_full(OSError(errno.EACCES, "Permission denied")) and not disk_full(ValueError("x"))
    # An error that lost its errno (libsndfile's "System error."): the room left on the disk tells.
    assert disk_full(RuntimeError("System error."), tmp_path, room=10**18)
    assert not disk_full(RuntimeError("System error."), tmp_path, room=0)


def test_file_systems_are_told_apart(tmp_path, small_disk):
    assert same_file_system(tmp_path, tmp_path / "a" / "b")
    disk = small_disk(65536)
    assert not same_file_system(tmp_path, disk.path / "inside")
    assert free_bytes(disk.path) == pytest.approx(65536, abs=4096)


def test_the_files_a_disk_can_still_hold_are_its_free_inodes(small_disk):
    """A disk with bytes free and no inodes left refuses new files: it is full all the same."""
    from musicssl.paths import free_files

    disk = small_disk(1_000_000, files=40)  # its root folder takes one
    assert free_files(disk.path) == 39 and free_files(disk.path / "not" / "made") == 39
    for number in range(10):
        (disk.path / f"f{number}").touch()
    assert free_files(disk.path) == 29
    with pytest.raises(OSError) as full:
        for number in range(10, 100):
            (disk.path / f"f{number}").touch()
    assert full.value.errno == errno.ENOSPC and free_files(disk.path) == 0
    assert free_bytes(disk.path) > 900_000


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_whole_with_keep_places_a_file_only_where_none_good_is(tmp_path, monkeypatch, hard_links):
    """``whole(target, keep=...)``: the file written is placed where none is, and over one ``keep()`` finds bad;
    a good one (another process wrote it meanwhile) stays, the same file, and the copy written is dropped. On a
    file system without hard links the same, by a check and a rename."""
    import os

    from musicssl.paths import whole

    if not hard_links:
        def no_link(*args, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "cache.bin"
    good = lambda: target.read_bytes().startswith(b"good")  # noqa: E731
    with whole(target, keep=good) as partial:
        partial.write_bytes(b"good, first")
    assert target.read_bytes() == b"good, first"
    inode = target.stat().st_ino
    with whole(target, keep=good) as partial:
        partial.write_bytes(b"good, second")
    assert target.read_bytes() == b"good, first" and target.stat().st_ino == inode
    target.write_bytes(b"damaged")
    with whole(target, keep=good) as partial:
        partial.write_bytes(b"good, third")
    assert target.read_bytes() == b"good, third"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.bin"]  # no partial file left
