"""`difffeat.data.staging.staged`, which every synthesizer writes through: entries move into place only when the
block ends, an earlier (cut-short) entry of the same name is replaced, a symbolic link there is removed and not
followed, a full disk is one line naming the folder, an undeclared entry is a writer's bug, and the temporary
folder never stays."""

from __future__ import annotations

import pytest

from difffeat.data.staging import staged
from difffeat.errors import UserError


def test_entries_replace_the_earlier_ones_and_links_are_not_followed(tmp_path):
    out, elsewhere = tmp_path / "set", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the set's")
    (out / "train").mkdir()
    (out / "train" / "half.png").write_text("cut short")
    (out / "test").symlink_to(elsewhere, target_is_directory=True)
    (out / "mine.txt").write_text("the user's")
    with staged(out, "demo", "demo set", owned=("train", "test")) as tmp:
        assert tmp.parent == out and tmp.name.startswith(".demo.tmp-")
        for split in ("train", "test"):
            (tmp / split).mkdir()
            (tmp / split / "new.png").write_text(split)
        assert (out / "train" / "half.png").is_file()  # nothing moves before the block ends
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "test", "train"]
    assert [p.name for p in (out / "train").iterdir()] == ["new.png"]
    assert not (out / "test").is_symlink() and (out / "test" / "new.png").read_text() == "test"
    assert (elsewhere / "keep.txt").read_text() == "not the set's"  # the link was removed, its target kept
    assert (out / "mine.txt").read_text() == "the user's"


def test_a_full_disk_is_one_line_and_nothing_moves(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "train").mkdir()
    with pytest.raises(UserError, match=r"set: cannot write the demo set \(No space left on device\)"):
        with staged(out, "demo", "demo set") as tmp:
            (tmp / "train").mkdir()
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["train"]  # the earlier entry stays, no temporary folder


def test_an_undeclared_entry_is_the_writers_bug(tmp_path):
    with pytest.raises(RuntimeError, match="demo set wrote stray, which it does not declare as its own"):
        with staged(tmp_path, "demo", "demo set", owned=("train",)) as tmp:
            (tmp / "stray").mkdir()
    assert list(tmp_path.iterdir()) == []
