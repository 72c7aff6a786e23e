"""Folders as people have them: hidden entries (.ipynb_checkpoints/, .DS_Store, __MACOSX/) are neither
classes nor images, in training, data.py --check and --ref trees; --recipe toy trains the quick start's
model on a folder."""
import os
import subprocess
import sys
from dataclasses import asdict

import torch
from PIL import Image

import evaluate
import train
from conftest import ROOT
from data import build_dataset, folder_settings, skipped
from model import make_config


def images(folder, n, size=40, start=0):
    os.makedirs(folder, exist_ok=True)
    for k in range(start, start + n):
        colour = (k * 20 % 256, 255 - k * 20 % 256, k * 7 % 256)
        Image.new("RGB", (size, size), colour).save(os.path.join(folder, f"{k}.png"))


def jupyter_flat(root):
    """12 images, a Jupyter checkpoint copy of one of them and a Finder .DS_Store."""
    images(root, 12)
    images(os.path.join(root, ".ipynb_checkpoints"), 1)
    with open(os.path.join(root, ".DS_Store"), "wb") as f:
        f.write(b"\x00\x00\x00\x01Bud1" + bytes(100))
    return str(root)


def test_a_flat_folder_with_hidden_entries_is_flat_and_holds_its_real_images(tmp_path):
    root = jupyter_flat(tmp_path / "flat")
    ds, num_classes = build_dataset("folder", root, 32)
    assert num_classes == 0 and len(ds) == 12
    assert all(".ipynb" not in path for path, _ in ds.samples)
    assert folder_settings(root) == dict(image_size=40, num_classes=0, num_images=12)
    assert skipped(root) == ".ipynb_checkpoints/, 1 hidden file"


def test_macosx_is_not_a_class(tmp_path):
    root = tmp_path / "classes"
    images(root / "0", 3)
    images(root / "1", 3, start=3)
    os.makedirs(root / "__MACOSX" / "0")
    (root / "__MACOSX" / "0" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")   # not an image
    ds, num_classes = build_dataset("folder", str(root), 32)
    assert num_classes == 2 and ds.classes == ["0", "1"] and len(ds) == 6
    assert folder_settings(str(root))["num_classes"] == 2
    assert skipped(str(root)) == "__MACOSX/"


def test_data_check_counts_the_real_images_and_names_what_it_skipped(tmp_path):
    root = jupyter_flat(tmp_path / "flat")
    r = subprocess.run([sys.executable, "data.py", "--check", "--dataset", "folder", "--data_dir", root],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped: .ipynb_checkpoints/, 1 hidden file" in r.stdout
    assert "0 of 12 images unreadable" in r.stdout


def test_a_ref_tree_with_hidden_folders_is_its_visible_images(tmp_path):
    clean, messy = tmp_path / "clean", tmp_path / "messy"
    for root in (clean, messy):
        images(root / "a", 3)
        images(root / "b", 2, start=3)
    images(messy / ".ipynb_checkpoints", 2, start=9)
    images(messy / "a" / ".thumbnails", 1, start=11)
    os.makedirs(messy / "__MACOSX")
    (messy / "__MACOSX" / "._a.png").write_bytes(b"AppleDouble")
    (messy / "a" / ".hidden.png").write_bytes(b"not an image")
    a, b = (evaluate.reference(str(r), {}, 32)[0] for r in (clean, messy))
    assert len(a) == len(b) == 5
    assert all(torch.equal(a[i], b[i]) for i in range(5))              # the same images: the same FID


def test_recipe_toy_trains_the_quick_start_model_on_a_folder(tmp_path, capsys):
    root = jupyter_flat(tmp_path / "flat")
    out = str(tmp_path / "run")
    train.main(["--dataset", "folder", "--data_dir", root, "--recipe", "toy", "--max_steps", "2",
                "--batch_size", "4", "--sample_every", "1000", "--num_workers", "0", "--out_dir", out])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("folder:"))
    assert "12 images and no class subfolder" in line and "(skipped: .ipynb_checkpoints/, 1 hidden file)" in line
    assert "the toy recipe's settings (--recipe toy) at 32px" in line
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    quick_start = {**asdict(make_config("tiny", "toy")), "num_classes": 0}   # the data set aside
    assert ckpt["config"] == quick_start
    args = ckpt["args"]
    assert (args["alpha"], args["band"], args["epochs"], args["base_lr"]) == (80, 85, 16, 8e-2)
    assert list(args["w"]) == [50.0, 0.0, 25.0, 0.0, 1.0]
    # --init_from a recipe run: its data set, folder and recipe carry over with its model.
    train.main(["--init_from", os.path.join(out, "last.pt"), "--max_steps", "1", "--batch_size", "4",
                "--sample_every", "1000", "--num_workers", "0", "--out_dir", str(tmp_path / "ft")])
    again = torch.load(os.path.join(tmp_path / "ft", "last.pt"), weights_only=True)
    assert again["config"] == quick_start and again["args"]["recipe"] == "toy"
    assert (again["args"]["base_lr"], again["args"]["model"]) == (8e-2, "tiny")


def test_recipe_is_for_folders(capsys):
    import pytest
    with pytest.raises(SystemExit) as exc:
        train.get_args(["--dataset", "toy", "--recipe", "cifar10"])
    assert exc.value.code == 2 and "--recipe is for --dataset folder" in capsys.readouterr().err


def test_imagenet_needs_class_folders(tmp_path):
    import pytest
    from cli import DataError
    images(tmp_path / "train", 3)                                   # images straight in train/
    with pytest.raises(DataError, match="no images found for imagenet"):
        build_dataset("imagenet", str(tmp_path), 32)
    assert build_dataset("folder", str(tmp_path / "train"), 32)[1] == 0   # a folder may be flat


def test_the_metrics_table_prints_counts_as_integers(capsys):
    evaluate.print_table([{"cfg": 1.0, "steps": 4, "gFID": 12.3456, "samples": 50_000, "reference_images": None}])
    assert capsys.readouterr().out.split("\n")[1].split() == ["1", "4", "12.35", "50000", "-"]
