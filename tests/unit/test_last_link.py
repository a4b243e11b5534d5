"""`last.ckpt` is a link swapped atomically, also over the directory an older version wrote there."""

from common.checkpoint.files import LAST_LINK, link_last


def test_last_link_replaces_links_and_an_old_last_directory(tmp_path):
    for name in ("step000002.ckpt", "step000004.ckpt"):
        (tmp_path / name).mkdir()
    old = tmp_path / LAST_LINK
    old.mkdir()  # Lightning's save_last copy, from a run directory of an earlier version
    (old / "meta.pt").write_bytes(b"x")
    link_last(tmp_path / "step000002.ckpt")
    assert old.is_symlink() and old.resolve() == (tmp_path / "step000002.ckpt").resolve()
    link_last(tmp_path / "step000004.ckpt")
    assert old.resolve() == (tmp_path / "step000004.ckpt").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_LINK, "step000002.ckpt", "step000004.ckpt"]
