"""The btrfs layer backend: subvolumes made, snapshotted and deleted through ioctls."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cove.storage.layers import Btrfs, btrfs_available


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Btrfs]:
    if not btrfs_available():
        pytest.skip("btrfs is not available here (apt-get install btrfs-progs)")
    image, root = tmp_path / "fs.img", tmp_path / "fs"
    root.mkdir()
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(root)], check=True)
    try:
        yield Btrfs(root)
    finally:
        subprocess.run(["umount", str(root)], check=True)  # a loop mount's device goes with it


def subvolumes(root: Path) -> set[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(root)], capture_output=True, text=True)
    return {line.rsplit(" ", 1)[-1] for line in out.stdout.splitlines()}


def test_volume_snapshot_clone_delete(btrfs: Btrfs) -> None:
    vol, snap, clone = btrfs.root / "vol", btrfs.root / "snap", btrfs.root / "clone"
    btrfs.volume(vol)
    (vol / "f").write_text("one")
    btrfs.snapshot(vol, snap)
    btrfs.clone(snap, clone)
    assert subvolumes(btrfs.root) == {"vol", "snap", "clone"}
    (vol / "f").write_text("two")
    assert (snap / "f").read_text() == "one", "a snapshot is a copy of that instant"
    with pytest.raises(OSError) as e:
        (snap / "f").write_text("x")
    assert e.value.errno == errno.EROFS, "a snapshot is read-only"
    (clone / "f").write_text("three")  # a clone is writable, and its own
    assert (snap / "f").read_text() == "one" and (vol / "f").read_text() == "two"
    for path in (clone, snap, vol):
        btrfs.delete(path)
        assert not path.exists()
    assert subvolumes(btrfs.root) == set()
    btrfs.delete(vol)  # already gone: nothing to do


def test_errors_name_the_path(btrfs: Btrfs) -> None:
    vol = btrfs.root / "vol"
    btrfs.volume(vol)
    with pytest.raises(OSError, match="vol") as e:
        btrfs.volume(vol)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError, match="missing"):
        btrfs.snapshot(btrfs.root / "missing", btrfs.root / "snap")
    with pytest.raises(OSError, match="bad subvolume name"):
        btrfs.volume(btrfs.root / ("x" * 5000))
    plain = btrfs.root / "plain"
    (plain / "sub").mkdir(parents=True)
    btrfs.delete(plain)  # not a subvolume: removed as a directory
    assert not plain.exists()


def test_commit_and_flatten_are_retry_safe(btrfs: Btrfs) -> None:
    """The caller names the layer a commit or flatten makes: a retried call (its answer lost on the
    way back) finds that layer instead of making a second one."""
    from cove.storage.layers import LayerStore

    store = LayerStore(btrfs.root, btrfs)
    base = store.build(lambda root: (root / "base.txt").write_text("base\n"))
    active = store.prepare("sb1", [base], (0, 0))
    (active.upper / "mine.txt").write_text("one\n")
    assert store.commit("sb1", "snap-a") == "snap-a"
    (active.upper / "mine.txt").write_text("two\n")  # a retry must not seal a second, later copy
    assert store.commit("sb1", "snap-a") == "snap-a"
    assert (store.path("snap-a") / "mine.txt").read_text() == "one\n"
    assert store.flatten([base, "snap-a"], "flat-a") == "flat-a"
    assert store.flatten([base, "snap-a"], "flat-a") == "flat-a"
    assert {p.name for p in (store.path("flat-a")).iterdir()} == {"base.txt", "mine.txt"}
    assert store.layer_ids() == {base, "snap-a", "flat-a"}
    store.remove_active("sb1")
