"""Atomic writes leave either the old file or the new one, never a partial one or a temp file."""

import json
import os
import stat

import pytest

from peft_ext.io import atomic_directory, atomic_write, write_json


def test_write_json_is_atomic_and_readable_by_others(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"old": True})

    def broken(temporary):
        with open(temporary, "w") as handle:
            handle.write('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(target) as temporary:
            (temporary / "adapter_config.json").write_text("{}")
            raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as temporary:
        (temporary / "a.txt").write_text("new")
        assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (target / "a.txt").read_text() == "new"
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_directory(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as temporary:
            (temporary / "b.txt").write_text("newer")
            raise RuntimeError("failed")
    assert [p.name for p in target.iterdir()] == ["a.txt"]  # the old folder survives a failed overwrite
    with atomic_directory(target, overwrite=True) as temporary:
        (temporary / "b.txt").write_text("newer")
    assert [p.name for p in target.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["adapter"]
