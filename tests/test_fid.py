"""sample.py's FID inputs: the reference (--ref folder tree, ADM .npz or statistics .npz, else --ref_count training
images) and its cache key. The metrics themselves, with a stand-in Inception: tests/test_eval.py."""
import numpy as np
import pytest
import torch
from PIL import Image

from cli import DataError
from data import build_dataset
from evaluate import Images, cache_name, reference


def tree(root, sizes):
    """Class subfolders of random-pixel PNGs of the given (w, h) sizes (one greyscale, one nested deeper), a .txt."""
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(sizes):
        d = root / f"class{k % 2}" / ("deep" if k == 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w) if k == 3 else (h, w, 3), dtype=np.uint8)).save(d / f"{k}.png")
    (root / "class0" / "notes.txt").write_text("not an image")
    return root


def test_ref_folder_tree_of_mixed_sizes_loads_like_training(tmp_path):
    root = tree(tmp_path / "ref", [(40, 30), (64, 64), (20, 50), (33, 33), (100, 7)])
    for size in (32, 96):                                                       # NEAREST, BICUBIC resize
        ds, stats, name = reference(str(root), None, size)
        x = torch.stack([ds[i] for i in range(len(ds))])
        assert stats is None and x.shape == (5, 3, size, size) and x.dtype == torch.uint8         # all 5 images, the .txt skipped
        assert (x[4] == x[4, :1]).all() and not (x[0] == x[0, :1]).all()       # class1/3.png: grey as RGB
        train, _ = build_dataset("folder", str(root), size)                     # the training transform, same files
        assert torch.equal(x, torch.stack([Images(train)[i] for i in range(len(train))]))
        assert name == cache_name("ref", str(root), size, 5)


def test_two_folder_trees_never_share_fid_statistics(tmp_path):
    a, b = (tree(tmp_path / n, [(32, 32)] * 4) for n in "ab")                   # same size, same count
    name = lambda d: reference(None, {"dataset": "folder", "data_dir": str(d)}, 32)[2]
    assert name(a) != name(b) and name(a) == name(tmp_path / "a" / ".." / "a")  # the absolute path counts
    assert name(a).startswith("sphere-folder-") and name(a).endswith("-32px-4")
    assert len({cache_name("folder", str(a), s, n) for s, n in [(32, 4), (64, 4), (32, 5)]}) == 3
    assert reference(None, {"dataset": "toy"}, 32)[2] == "sphere-toy-builtin-32px-10000"
    flat = tmp_path / "a" / "class1"                                            # images, no subfolder: unconditional
    assert len(reference(None, {"dataset": "folder", "data_dir": str(flat)}, 32)[0]) == 2   # the training set's
    assert len(reference(str(flat), None, 32)[0]) == 2                                     # as --ref


def test_ref_npz_in_adm_format_and_bad_refs(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)   # arr_0: uint8 NHWC
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=arr, arr_1=np.arange(5))
    ds, _, name = reference(str(tmp_path / "VIRTUAL_ref.npz"), None, 32)
    assert len(ds) == 5 and ds[4].dtype == torch.uint8 and torch.equal(ds[4], torch.from_numpy(arr[4]).permute(2, 0, 1))
    assert name.endswith("-32px-5")
    np.savez(tmp_path / "other.npz", images=arr)
    np.savez(tmp_path / "stats.npz", mu=np.ones(2048, np.float32), sigma=np.eye(2048, dtype=np.float32))
    np.savez(tmp_path / "small.npz", mu=np.ones(64), sigma=np.eye(64))
    ds, stats, _ = reference(str(tmp_path / "stats.npz"), None, 32)             # the release's fid_stats_*.npz
    assert ds is None and stats["mu"].dtype == np.float64 and stats["sigma"].shape == (2048, 2048)
    (tmp_path / "empty").mkdir()
    for ref, msg in [("VIRTUAL_ref.npz", "arr_0 is uint8 (5, 32, 32, 3); this model's are uint8 (N, 64, 64, 3)"),
                     ("other.npz", "is not an ADM reference batch ('arr_0 is not a file in the archive')"),
                     ("empty", "holds no images"), ("small.npz", "mu (64,), sigma (64, 64); Inception's pool"),
                     ("missing", "is neither an image folder nor an .npz")]:
        with pytest.raises(DataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            reference(str(tmp_path / ref), None, 64 if ref.startswith("V") else 32)
