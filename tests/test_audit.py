"""The copy audit: which held-out images set the threshold, the screen of a generated set, and `meddiff audit`'s
shareable folder (only the files that are not copies, their manifest rows, nothing written when it fails)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meddiff.audit import AuditConfig, audit_folder, copy_audit, heldout_split, write_shareable
from meddiff.cli import main
from meddiff.errors import ConfigError
from meddiff.imagesets import load_images
from synthetic import disguised, textured, volume, write


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """real/ and train/ (independent), mixed/ (6 disguised training copies and 6 independent images a class, and a
    manifest of all), classes a and b, 12 PNGs each."""
    root = tmp_path_factory.mktemp("audit")
    for k, cls in enumerate("ab"):
        write(root / "real" / cls, textured(12, 10 + k))
        write(root / "train" / cls, textured(12, 20 + k))
        write(root / "mixed" / cls, np.concatenate([disguised(textured(12, 20 + k))[:6], textured(6, 40 + k)]))
    rows = [f"{c}/{i:03d}.png,{c},{i}" for c in "ab" for i in range(12)]
    (root / "mixed" / "manifest.csv").write_text("file,class,seed\n" + "\n".join(rows) + "\n")
    return {n: root / n for n in ("real", "train", "mixed")}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_copy_audit_flags_the_disguised_copies_against_the_held_out_threshold(folders):
    train = load_images(str(folders["train"]), "--train", 32, 1, None)
    real = load_images(str(folders["real"]), "--real", 32, 1, None)
    mixed = load_images(str(folders["mixed"]), "--fake", 32, 1, None)
    held = heldout_split(real, train, 0)
    assert held.side == "real" and held.mask.all() and held.how == "24 --real images not in --train"
    audit = copy_audit(mixed.images, train, real, held)
    copies = np.tile(np.arange(12) < 6, 2)
    assert not audit.keep[copies].any() and audit.keep[~copies].sum() >= 10
    assert audit.n_train == 24 and len(audit.heldout) == 24


def test_with_real_inside_train_part_of_train_is_held_out_by_group(folders):
    train = load_images(str(folders["train"] / "a"), "--train", 32, 1, None)
    held = heldout_split(train, train, 0)   # --real is the training set: no novel real image
    assert held.side == "train" and held.mask.any() and not (held.mask & held.gallery).any()
    assert held.how.startswith(f"{int(held.mask.sum())} --train images held out by group")


def test_audit_copies_only_the_images_that_are_not_training_copies(folders, tmp_path, capsys):
    out = tmp_path / "share"
    code, text, _ = run_cli(["audit", "--fake", str(folders["mixed"]), "--train", str(folders["train"]), "--real",
                             str(folders["real"]), "--out", str(out), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0
    copied = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert not any(int(name[-7:-4]) < 6 for name in copied)          # no disguised copy reaches the folder
    assert len(copied) >= 10 and "12 flagged" in text                # and the independent images do
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "file,class,seed" and sorted(r.split(",")[0] for r in manifest[1:]) == copied
    code, _, err = run_cli(["audit", "--fake", str(folders["mixed"]), "--train", str(folders["train"]), "--real",
                            str(folders["real"]), "--out", str(out)], capsys)
    assert code != 0 and "exists and is not an empty folder" in err


def test_the_library_call_reports_kept_and_flagged_files_relative_to_fake(folders, tmp_path):
    result = audit_folder(AuditConfig(fake=str(folders["mixed"]), train=str(folders["train"]),
                                      real=str(folders["real"]), out=str(tmp_path / "share")))
    assert len(result.kept) + len(result.flagged) == 24 and len(result.flagged) == result.copies.n_flagged
    assert all(not p.is_absolute() for p in result.kept + result.flagged)
    assert sorted(p.as_posix() for p in result.kept) == sorted(
        p.relative_to(result.out).as_posix() for p in result.out.rglob("*.png"))


def test_an_out_that_is_a_file_is_refused_before_any_work(folders, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*file: exists and is not a folder"):
        audit_folder(AuditConfig(fake=str(folders["mixed"]), train=str(folders["train"]), real=str(folders["real"]),
                                 out=str(target)))


def test_a_failed_copy_leaves_no_folder_behind(folders, tmp_path, monkeypatch):
    out = tmp_path / "share"
    calls = []

    def failing_copy(src: Path, dest: Path) -> None:
        calls.append(src)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        Path(dest).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr("meddiff.audit.shutil.copy2", failing_copy)
    kept = [Path("a/006.png"), Path("a/007.png"), Path("a/008.png"), Path("b/006.png")]
    with pytest.raises(OSError, match="No space left"):
        write_shareable(folders["mixed"], kept, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []   # no half-written folder, no temporary left
    write_shareable(folders["mixed"], kept[:2], out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a/006.png", "a/007.png"]
    rows = (out / "manifest.csv").read_text().splitlines()
    assert rows == ["file,class,seed", "a/006.png,a,6", "a/007.png,a,7"]


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Flat folders of the slices of smooth volumes: even/ and odd/ slices of one volume (neighbours), other/ the
    even slices of another volume, all/ the 100 slices of the first, fake/ 8 slices of a third volume."""
    root = tmp_path_factory.mktemp("slices")
    one, other, third = volume(100, 0), volume(100, 1), volume(100, 2)
    return {"even": write(root / "even", one[::2]), "odd": write(root / "odd", one[1::2]),
            "other": write(root / "other", other[::2]), "all": write(root / "all", one),
            "fake": write(root / "fake", third[::12])}


def _audit(slices: dict[str, Path], tmp_path: Path, train: str, real: str, by: str = "group"):
    return audit_folder(AuditConfig(fake=str(slices["fake"]), train=str(slices[train]), real=str(slices[real]),
                                    out=str(tmp_path / f"share_{train}_{real}_{by}"), heldout_split=by))


def test_held_out_neighbours_of_training_slices_are_reported_as_blind(slices, tmp_path, capsys):
    result = _audit(slices, tmp_path, "even", "odd")
    assert result.warning is not None and result.warning.startswith("the copy audit cannot see: ")
    assert "not disjoint from --train" in result.warning and "give --real images of other patients" in result.warning
    assert result.copies.threshold > 0.99
    code, text, _ = run_cli(["audit", "--fake", str(slices["fake"]), "--train", str(slices["even"]), "--real",
                             str(slices["odd"]), "--out", str(tmp_path / "cli")], capsys)
    assert code == 0 and "\nwarning: the copy audit cannot see: " in text


def test_held_out_images_of_another_volume_give_no_warning(slices, tmp_path, capsys):
    result = _audit(slices, tmp_path, "even", "other")
    assert result.warning is None and result.copies.threshold < 0.99
    code, text, _ = run_cli(["audit", "--fake", str(slices["fake"]), "--train", str(slices["even"]), "--real",
                             str(slices["other"]), "--out", str(tmp_path / "cli")], capsys)
    assert code == 0 and "warning" not in text


def test_a_contiguous_split_of_one_volume_s_slices_sees_again(slices, tmp_path):
    single = _audit(slices, tmp_path, "all", "all")          # --real is --train: 20 % of the slices held out
    assert single.heldout.startswith("20 --train images held out by group")
    assert single.warning is not None and "--heldout-split contiguous" in single.warning
    runs = _audit(slices, tmp_path, "all", "all", "contiguous")
    assert runs.heldout.startswith("20 --train images held out in runs of consecutive images")
    assert runs.warning is None and runs.copies.threshold < single.copies.threshold


def test_an_unknown_split_is_refused_naming_the_flag(slices, tmp_path):
    with pytest.raises(ConfigError, match=r"--heldout-split 'random'; allowed: group, contiguous"):
        _audit(slices, tmp_path, "even", "odd", "random")
