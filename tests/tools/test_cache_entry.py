"""Cache entries appear whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvfleet.tools.cache_entry import publish


def test_publish_renames_a_filled_entry_into_place(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "thing-abc"
    got = publish(target, lambda tmp: (tmp / "done.json").write_text("{}"), "done.json")
    assert got == target and (target / "done.json").read_text() == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["thing-abc"]  # no temporary left


def test_a_concurrent_winner_counts_as_done(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    target.mkdir()
    (target / "done.json").write_text("first")
    (target / "other").write_text("x")  # non-empty: the rename fails
    publish(target, lambda tmp: (tmp / "done.json").write_text("second"), "done.json")
    assert (target / "done.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_a_failed_fill_leaves_nothing(tmp_path: Path) -> None:
    def boom(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        publish(tmp_path / "thing", boom, "done.json")
    assert list(tmp_path.iterdir()) == []


def test_a_target_in_the_way_without_the_marker_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    target.mkdir()
    (target / "junk").write_text("x")
    with pytest.raises(OSError):
        publish(target, lambda tmp: (tmp / "done.json").write_text("{}"), "done.json")
