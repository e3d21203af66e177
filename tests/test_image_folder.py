"""data.name=image_folder: paired and class folders of PNG/JPEG/TIFF images decoded lazily, crop and flip that
depend only on (seed, epoch, index), training and an exact mid-epoch resume with DataLoader workers, and every
bad folder refused before training with one line."""

import json
import re
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

import cr_accel.data.images as images
from cr_accel.cli import main_train
from cr_accel.errors import UserError
from cr_accel.preemption import PREEMPTED_EXIT_CODE
from tests.runners import (PROBE, ROOT, assert_same_weights, launch_2_cpu_processes, metric_rows, own_data_config,
                           run_1_process)

image_folder = images.image_folder
SHARED_KEYS = {
    "dataset", "task", "input_shape", "target_shape", "input_dtype", "target_dtype",
    "num_train", "num_val", "data_range", "normalization", "source",
}  # fmt: skip


def pixels(seed, shape, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.random(shape, dtype=np.float32).astype(dtype) * 4 - 1  # a float range other than [0, 1]
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def save(path, array):
    """PNG (8- or 16-bit), JPEG or TIFF by the suffix; returns the array as written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return array


def paired(root, n=12, size=(12, 16), inputs=(".png", np.uint8), targets=(".png", np.uint8), same=False):
    """n input/target pairs named 00..; with `same` each target holds its input's pixels (augmentation checks)."""
    for i in range(n):
        array = save(root / "inputs" / f"{i:02d}{inputs[0]}", pixels(i, size, inputs[1]))
        save(root / "targets" / f"{i:02d}{targets[0]}", array if same else pixels(100 + i, size, targets[1]))
    return root


def classes(root, counts=(("cat", 5), ("ant", 4), ("dog", 3)), size=(8, 8, 3)):
    for name, count in counts:
        for i in range(count):
            save(root / name / f"{name}{i}.png", pixels(10 * sum(map(ord, name)) + i, size))
    return root


# ---------------------------------------------------------------- the builder's contract


@pytest.mark.parametrize("suffix, dtype, scale", [(".png", np.uint8, 255), (".png", np.uint16, 65535),
                                                  (".tif", np.uint16, 65535), (".tif", np.float32, None),
                                                  (".tif", np.uint8, 255)],
                         ids=["png8", "png16", "tiff16", "tiff-float32", "tiff8"])
def test_paired_folders_decode_each_format_to_scaled_float32(tmp_path, suffix, dtype, scale):
    root = paired(tmp_path / "train", n=3, inputs=(".png", np.uint8), targets=(suffix, dtype))
    val = paired(tmp_path / "val", n=2, inputs=(".png", np.uint8), targets=(suffix, dtype))
    splits = image_folder(seed=0, path=str(root), val_path=str(val))
    assert (len(splits.train), len(splits.val)) == (3, 2)
    x, y = splits.train[1]
    assert x.shape == y.shape == (1, 12, 16) and x.dtype == y.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(pixels(1, (12, 16)).astype(np.float32)) / 255)
    stored = torch.from_numpy(pixels(101, (12, 16), dtype).astype(np.float32))
    assert torch.equal(y[0], stored / scale if scale else stored)
    meta = splits.metadata
    assert SHARED_KEYS <= meta.keys() and json.loads(json.dumps(meta)) == meta
    assert (meta["task"], meta["input_shape"], meta["target_shape"]) == ("reconstruction", [1, 12, 16], [1, 12, 16])
    assert (meta["input_dtype"], meta["target_dtype"]) == ("float32", "float32")
    assert (meta["num_train"], meta["num_val"], meta["num_test"]) == (3, 2, 0)
    assert meta["source"]["stored"] == {"inputs": "uint8", "targets": np.dtype(dtype).name}
    if scale:
        assert meta["data_range"] == [0.0, 1.0]
    else:  # observed over the training targets only
        observed = torch.stack([splits.train[i][1] for i in range(3)])
        assert meta["data_range"] == [float(observed.min()), float(observed.max())]
        given = image_folder(seed=0, path=str(root), val_path=str(val), data_range=[-1, 3])
        assert given.metadata["data_range"] == [-1.0, 3.0]


def test_rgb_png_and_jpeg_are_3_channel_and_grayscale_1(tmp_path):
    rgb = save(tmp_path / "rgb" / "inputs" / "a.png", pixels(0, (8, 4, 3)))
    save(tmp_path / "rgb" / "targets" / "a.jpg", pixels(1, (8, 4)))
    splits = image_folder(seed=0, path=str(tmp_path / "rgb"), val_path=str(tmp_path / "rgb"))
    x, y = splits.train[0]
    assert x.shape == (3, 8, 4) and y.shape == (1, 8, 4)
    assert torch.equal(x, torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) / 255)
    assert 0 <= float(y.min()) and float(y.max()) <= 1  # JPEG: lossy, but scaled like any 8-bit image


def test_class_folders_give_sorted_labels_and_a_seeded_split(tmp_path):
    root = classes(tmp_path / "c")
    splits = image_folder(seed=3, path=str(root), val_ratio=0.25)
    meta = splits.metadata
    assert meta["classes"] == ["ant", "cat", "dog"] and meta["num_classes"] == 3
    assert (meta["task"], meta["target_shape"], meta["target_dtype"], meta["data_range"]) == (
        "classification", [], "int64", None)
    assert (meta["num_train"], meta["num_val"], meta["input_shape"]) == (9, 3, [3, 8, 8])
    labelled = {}
    for dataset in (splits.train, splits.val):
        for i in range(len(dataset)):
            x, label = dataset[i]
            assert x.shape == (3, 8, 8) and label.dtype == torch.int64 and label.shape == ()
            labelled[dataset.inputs[i]] = int(label)
    assert len(labelled) == 12  # a partition of the 12 images
    assert all(labelled[f] == ["ant", "cat", "dog"].index(f.split("/")[-2]) for f in labelled)
    again, other = image_folder(seed=3, path=str(root), val_ratio=0.25), image_folder(seed=4, path=str(root),
                                                                                       val_ratio=0.25)
    assert again.val.inputs == splits.val.inputs and other.val.inputs != splits.val.inputs


def test_a_test_split_by_ratio_or_folder_leaves_validation_as_it_was(tmp_path):
    root = classes(tmp_path / "c", counts=(("cat", 10), ("ant", 10)))
    without = image_folder(seed=3, path=str(root), val_ratio=0.2)
    split = image_folder(seed=3, path=str(root), val_ratio=0.2, test_ratio=0.3)
    assert split.val.inputs == without.val.inputs  # the test set comes after validation in the same shuffle
    train, val, test = set(split.train.inputs), set(split.val.inputs), set(split.test.inputs)
    assert (len(train), len(val), len(test)) == (10, 4, 6) and not (train & val or train & test or val & test)
    assert split.metadata["num_test"] == 6 and split.metadata["source"]["test_split"] == {"test_ratio": 0.3, "seed": 3}
    assert without.test is None and without.metadata["num_test"] == 0
    held = classes(tmp_path / "held", counts=(("cat", 2),))
    by_folder = image_folder(seed=3, path=str(root), val_ratio=0.2, test_path=str(held))
    assert [int(by_folder.test[i][1]) for i in range(2)] == [1, 1]  # cat is label 1 of [ant, cat]
    with pytest.raises(UserError, match=r"data\.val_ratio=0\.6 and data\.test_ratio=0\.5 together"):
        image_folder(seed=3, path=str(root), val_ratio=0.6, test_ratio=0.5)


def test_validation_classes_keep_the_training_labels(tmp_path):
    train = classes(tmp_path / "train")
    val = classes(tmp_path / "val", counts=(("dog", 2),))
    splits = image_folder(seed=0, path=str(train), val_path=str(val))
    assert [int(splits.val[i][1]) for i in range(2)] == [2, 2]
    assert splits.metadata["source"]["split"] == "val_path"


def test_decoding_is_lazy_one_file_per_folder_at_build(tmp_path, monkeypatch):
    decoded, headers = [], []
    decode, read = images.decode_image, images.read_header
    monkeypatch.setattr(images, "decode_image", lambda f, *keep: decoded.append(f.parent.name) or decode(f, *keep))
    monkeypatch.setattr(images, "read_header", lambda f: headers.append(f) or read(f))
    splits = image_folder(seed=0, path=str(paired(tmp_path / "p", n=10, targets=(".tif", np.uint16))))
    assert sorted(decoded) == ["inputs", "targets"] and len(headers) == 20  # one decoded per folder; headers
    decoded.clear()
    splits.train[4]
    assert decoded == ["inputs", "targets"]
    decoded.clear()
    image_folder(seed=0, path=str(classes(tmp_path / "c")))
    assert sorted(decoded) == ["ant", "cat", "dog"]


def test_8_bit_images_are_handed_over_as_uint8_and_expand_to_the_same_bits(tmp_path):
    """Workers pass 8-bit images as stored (a quarter of float32's bytes); the scaling after the batch arrives gives
    the values __getitem__ gives, bit for bit. 16-bit and float images, and class labels, pass as before."""
    from torch.utils.data import default_collate

    from cr_accel.config import DataConfig
    from cr_accel.data import handover
    from cr_accel.validation import eval_loader

    root = paired(tmp_path / "p", n=6, inputs=(".png", np.uint8), targets=(".tif", np.uint16))
    labelled = image_folder(seed=0, path=str(classes(tmp_path / "c")), val_ratio=0.25)
    for dataset in (image_folder(seed=0, path=str(root), val_ratio=0.5, crop=8, flip=True).train, labelled.train):
        loader = eval_loader(DataConfig(), dataset)
        assert isinstance(loader.dataset, handover.Compact)
        compact = next(iter(loader))
        assert compact[0].dtype == torch.uint8 and compact[1].dtype in (torch.float32, torch.int64)
        expanded = handover.expander(loader)(*compact)
        direct = default_collate([dataset[i] for i in range(len(compact[0]))])
        assert expanded[0].dtype == torch.float32 and torch.equal(expanded[0], direct[0])
        assert torch.equal(expanded[1], direct[1])
        # On the CPU with workers the batches come by value, as NumPy arrays, and expand to the same bits.
        by_value = eval_loader(DataConfig(num_workers=1), dataset, device=torch.device("cpu"))
        arrays = next(iter(by_value))
        assert isinstance(arrays[0], np.ndarray) and arrays[0].dtype == np.uint8
        from_arrays = handover.expander(by_value)(*arrays)
        assert torch.equal(from_arrays[0], direct[0]) and torch.equal(from_arrays[1], direct[1])
        assert from_arrays[1].dtype == direct[1].dtype
    floats = image_folder(seed=0, path=str(paired(tmp_path / "f", n=4, inputs=(".tif", np.float32),
                                                  targets=(".tif", np.float32))), val_ratio=0.5)
    assert handover.for_loader(floats.train) is floats.train and handover.expander(DataLoader(floats.train)) is None


# ---------------------------------------------------------------- crop and flip


def augmented(tmp_path, **options):
    root = paired(tmp_path / "aug", n=8, size=(12, 16), same=True)
    return image_folder(seed=0, path=str(root), val_ratio=0.25, **options)


def test_crop_and_flip_are_the_same_on_input_and_target_and_vary_by_epoch(tmp_path):
    splits = augmented(tmp_path, crop=8, flip=True)
    assert splits.metadata["input_shape"] == splits.metadata["target_shape"] == [1, 8, 8]
    wholes = image_folder(seed=0, path=str(tmp_path / "aug"), val_ratio=0.25).train
    seen = set()
    for epoch in range(6):
        splits.train.set_epoch(epoch)
        for i in range(len(splits.train)):
            x, y = splits.train[i]
            assert x.shape == (1, 8, 8) and torch.equal(x, y)
            whole = wholes[i][0][0]
            found = [(t, l, f) for t in range(5) for l in range(9) for f in (0, 1)
                     if torch.equal(x[0], (whole.flip(-1) if f else whole)[t : t + 8, l : l + 8])]
            assert found, "not a crop of the image, flipped or not"
            seen.add((i, epoch, found[0]))
    assert len({place for _, _, place in seen}) > 20  # crops all over, flipped and not
    assert {flipped for _, _, (_, _, flipped) in seen} == {0, 1}
    for i in range(len(splits.train)):  # a sample's crop changes with the epoch
        assert len({place for j, _, place in seen if j == i}) >= 3


def test_augmentation_is_reproducible_and_validation_is_the_center_crop(tmp_path):
    a, b = augmented(tmp_path, crop=8, flip=True), augmented(tmp_path, crop=8, flip=True)
    a.train.set_epoch(2)
    b.train.set_epoch(2)
    assert all(torch.equal(a.train[i][0], b.train[i][0]) for i in range(len(a.train)))
    whole = image_folder(seed=0, path=str(tmp_path / "aug"), val_ratio=0.25).val[0][0]
    for epoch in (0, 5):
        a.val.set_epoch(epoch)
        assert torch.equal(a.val[0][0], whole[:, 2:10, 4:12])  # center, never flipped


def test_workers_see_the_epoch_and_draw_what_the_main_process_draws(tmp_path):
    splits = augmented(tmp_path, crop=8, flip=True)
    dataset = splits.train

    def one_pass(loader):
        return torch.cat([x for x, _ in loader])

    expected = {}
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        expected[epoch] = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert torch.equal(one_pass(DataLoader(dataset, batch_size=4, num_workers=0)), expected[epoch])
    # persistent workers, started at epoch 0, see set_epoch(3) through the shared-memory epoch
    loader = DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        assert torch.equal(one_pass(loader), expected[epoch])
    assert not torch.equal(expected[0], expected[3])


def test_building_and_augmenting_leave_global_rngs_untouched(tmp_path):
    torch.manual_seed(7)
    state = torch.get_rng_state()
    splits = augmented(tmp_path, crop=8, flip=True)
    splits.train[0], splits.val[0]
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- training


def run_config(folder, data_root, **data):
    return own_data_config(folder, {"name": "image_folder", "path": str(data_root), "val_ratio": 0.2, "crop": 8,
                                    "flip": True, "batch_size": 4, **data})


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    return paired(tmp_path_factory.mktemp("images"), n=20, inputs=(".png", np.uint8), targets=(".tif", np.uint16))


def test_each_epoch_reaches_the_dataset_on_2_processes(tmp_path, train_folder):
    """accelerate's loader passes set_epoch on to the dataset only where its sampler has none (1 process): the
    trainer passes it itself."""
    result = launch_2_cpu_processes(PROBE, "--config", run_config(tmp_path, train_folder), "--probe",
                                    tmp_path / "p.json")
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads((tmp_path / "p.json").read_text())
    assert probe["world_size"] == 2 and probe["dataset_epochs"] == [0, 1]


def test_a_run_stopped_mid_epoch_with_workers_resumes_to_the_weights_of_a_straight_run(tmp_path, train_folder):
    """The straight run reads in the main process; the stopped and resumed one with 2 workers: augmentation depends
    on neither, nor on where the run stopped."""
    straight = run_1_process(PROBE, "--config", run_config(tmp_path / "s", train_folder), "--probe",
                             tmp_path / "s/p.json")
    assert straight.returncode == 0, straight.stderr[-3000:]
    config = run_config(tmp_path / "r", train_folder, num_workers=2)
    first = run_1_process(PROBE, "--config", config, "--probe", tmp_path / "r/first.json", "--stop-at-step", 6)
    assert first.returncode == PREEMPTED_EXIT_CODE, first.stderr[-3000:]
    from cr_accel import checkpoint

    assert checkpoint.read_state(tmp_path / "r/run/checkpoints/last")["trainer"]["batch_in_epoch"] == 2
    second = run_1_process(PROBE, "--config", config, "--probe", tmp_path / "r/p.json",
                           "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_weights(tmp_path / "s/p.safetensors", tmp_path / "r/p.safetensors")
    assert [r["val_loss"] for r in metric_rows(tmp_path / "s/run")] == [
        r["val_loss"] for r in metric_rows(tmp_path / "r/run")]


# ---------------------------------------------------------------- bad data: one line, exit 2, nothing written


def unmatched(root):
    paired(root, n=4)
    (root / "inputs" / "03.png").rename(root / "inputs" / "07.png")


def corrupt(root):
    paired(root, n=4)
    (root / "targets" / "02.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def truncated_first(root):
    paired(root, n=4)
    data = (root / "inputs" / "00.png").read_bytes()
    (root / "inputs" / "00.png").write_bytes(data[: len(data) // 2])


def other_size(root):
    paired(root, n=4)
    save(root / "inputs" / "02.png", pixels(0, (12, 20)))


def other_depth(root):
    paired(root, n=4)
    save(root / "targets" / "01.png", pixels(0, (12, 16), np.uint16))


def empty_class(root):
    classes(root)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")


def nothing(root):
    root.mkdir()
    (root / "readme.txt").write_text("")


def only_inputs(root):
    paired(root, n=2)
    for f in (root / "targets").iterdir():
        f.unlink()
    (root / "targets").rmdir()


BAD = {
    "missing-folder": (lambda root: None, {}, r"data\.path.*does not exist"),
    "no-images": (nothing, {}, r"holds no image folders \(it holds: readme\.txt\).*`inputs/` and `targets/`"),
    "no-targets-folder": (only_inputs, {}, r"has a `inputs/` folder but no `targets/` folder"),
    "input-without-target": (unmatched, {}, r"1 image\(s\) in `.*/inputs` have no target of the same name in "
                                            r"`.*/targets`: 07\.png"),
    "empty-class-folder": (empty_class, {}, r"`.*/empty` has no images \(.*it holds: notes\.txt\); add images"),
    "corrupt-image": (corrupt, {}, r"cannot read the image `.*/targets/02\.png` \(.*\): it is corrupt"),
    "truncated-first-image": (truncated_first, {}, r"cannot read the image `.*/inputs/00\.png`"),
    "other-size": (other_size, {"crop": None},
                   r"`.*/inputs/02\.png` is 20x12 pixels \(width x height\) but `.*/inputs/00\.png` is 16x12 "
                   r".*set data\.crop"),
    "other-bit-depth": (other_depth, {}, r"`.*/targets/01\.png` is 1-channel uint16 but `.*/targets/00\.png` is "
                                         r"1-channel uint8"),
    "crop-larger-than-the-images": (lambda root: paired(root, n=4), {"crop": 16},
                                    r"`.*/inputs/00\.png` is 16x12 pixels .*smaller than data\.crop=16: set data\.crop "
                                    r"to at most 12"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_folders_are_one_user_error_before_anything_is_written(tmp_path, capsys, case):
    make, data, message = BAD[case]
    make(tmp_path / "data")
    config = run_config(tmp_path, tmp_path / "data", **data)
    assert main_train(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    if case != "missing-folder":  # that one is the config check's list of problems
        assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_through_train_py_an_unmatched_input_exits_2_with_one_line(tmp_path):
    unmatched(tmp_path / "data")
    result = run_1_process(ROOT / "train.py", "--config", run_config(tmp_path, tmp_path / "data"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and "07.png" in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_image_cut_off_after_its_header_stops_the_run_naming_it(tmp_path, capsys):
    """Only the first image of a folder is decoded at build: one whose header is sound but whose pixels are cut
    off is found when a worker reads it, and reported in one line all the same."""
    paired(tmp_path / "data", n=20)
    data = (tmp_path / "data" / "inputs" / "05.png").read_bytes()
    (tmp_path / "data" / "inputs" / "05.png").write_bytes(data[: len(data) // 2])
    assert main_train(["--config", str(run_config(tmp_path, tmp_path / "data", num_workers=2))]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: cannot read the image `.*/inputs/05\.png` \(OSError: image file is truncated\): .* "
                        r"\(read in a DataLoader worker\)\n", err), err


def test_an_image_of_another_size_is_fine_with_crop(tmp_path):
    other_size(tmp_path / "data")
    for f in (tmp_path / "data" / "targets" / "02.png",):
        save(f, pixels(1, (12, 20)))  # its target too: one crop is cut from both
    splits = image_folder(seed=0, path=str(tmp_path / "data"), val_ratio=0.25, crop=8)
    assert all(splits.train[i][0].shape == (1, 8, 8) for i in range(len(splits.train)))


def a_file_as_path(root):
    paired(root, n=2)
    (root / "x.png").write_text("")


def two_files_one_name(root):
    paired(root, n=2)
    save(root / "inputs" / "00.tif", pixels(0, (12, 16)))


def target_without_input(root):
    paired(root, n=2)
    save(root / "targets" / "09.png", pixels(9, (12, 16)))


def pair_of_two_sizes(root):
    save(root / "inputs" / "00.png", pixels(0, (8, 8)))
    save(root / "targets" / "00.png", pixels(0, (4, 8)))


def gray_among_rgb(root):
    classes(root)
    save(root / "ant" / "gray.png", pixels(0, (8, 8)))


def unknown_val_class(root):
    classes(root / "train")
    classes(root / "val", counts=(("bee", 1),))


def val_laid_out_otherwise(root):
    classes(root / "train")
    paired(root / "val", n=1)


def one_pair(name, array):
    def make(root):
        save(root / "inputs" / name, array)
        save(root / "targets" / "00.png", pixels(0, array.shape[-2:] if array.ndim == 2 else array.shape[:2]))
    return make


TRAIN_VAL = {"path": "{root}/train", "val_path": "{root}/val"}
MORE_BAD = {
    "path-is-a-file": (a_file_as_path, {"path": "{root}/x.png"}, r"is a file"),
    "two-files-one-name": (two_files_one_name, {}, r"two images named `00` \(`00\.png` and `00\.tif`\)"),
    "target-without-input": (target_without_input, {},
                             r"1 image\(s\) in `.*/targets` have no input of the same name in `.*/inputs`: 09\.png"),
    "pair-of-two-sizes-with-crop": (pair_of_two_sizes, {"crop": 4, "val_path": "{root}"},
                                    r"`.*/inputs/00\.png` is 8x8 pixels .*its target `.*/targets/00\.png` is 8x4"),
    "rgb-class-with-a-gray-image": (gray_among_rgb, {},
                                    r"`.*/ant/gray\.png` is 1-channel uint8 but `.*/ant/ant0\.png` is 3-channel uint8"),
    "missing-val-path": (classes, {"val_path": "{root}/val"}, r"data\.val_path .* does not exist"),
    "unknown-val-class": (unknown_val_class, TRAIN_VAL, r"class folder\(s\) bee that data\.path"),
    "val-laid-out-otherwise": (val_laid_out_otherwise, TRAIN_VAL,
                               r"holds `inputs/` and `targets/` folders but data\.path .* holds class folders"),
    "split-leaves-val-empty": (lambda root: paired(root, n=2), {"val_ratio": 0.2}, r"leaves the validation set empty"),
    "bad-options-together": (lambda root: paired(root, n=2), {"crop": 0, "flip": "yes", "val_ratio": 1},
                             r"data\.val_ratio.*; data\.crop.*; data\.flip"),
    "alpha-channel": (one_pair("00.png", pixels(0, (4, 4, 4))), {"val_path": "{root}"},
                      r"Pillow mode RGBA \(it has an alpha channel"),
    "tiff-stack": (one_pair("00.tif", pixels(0, (5, 4, 6))), {"val_path": "{root}"},
                   r"`.*/inputs/00\.tif` holds 5 pages \(a stack\)"),
    "signed-tiff": (one_pair("00.tif", pixels(0, (4, 4), np.int16)), {"val_path": "{root}"}, r"holds int16 values"),
}


@pytest.mark.parametrize("case", MORE_BAD, ids=list(MORE_BAD))
def test_more_bad_data_is_refused_naming_the_file(tmp_path, case):
    make, kwargs, message = MORE_BAD[case]
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    kwargs = {"path": "{root}", **kwargs}
    with pytest.raises(UserError, match=message):
        image_folder(seed=0, **{k: v.format(root=root) if isinstance(v, str) else v for k, v in kwargs.items()})


def test_a_16_bit_color_png_is_refused_rather_than_read_as_8_bits(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + np.full((3, 3), 1000, ">u2").tobytes() for _ in range(2))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "a.png").write_bytes(png)
    save(tmp_path / "targets" / "a.png", pixels(0, (2, 3)))
    with pytest.raises(UserError, match=r"`.*/inputs/a\.png` is a 16-bit color PNG.*save it as a 16-bit TIFF"):
        image_folder(seed=0, path=str(tmp_path), val_path=str(tmp_path))


@pytest.mark.parametrize("module, suffix, message", [
    ("tifffile", ".tif", r"`.*/00\.tif` is a TIFF, which cr_accel reads with tifffile, not installed: "
                         r"pip install -e '\.\[images\]'"),
    ("PIL", ".png", r"reads PNG and JPEG files with Pillow, which is not installed: pip install -e '\.\[images\]'"),
])
def test_a_missing_reader_names_the_images_extra(tmp_path, monkeypatch, module, suffix, message):
    root = paired(tmp_path, n=2, inputs=(suffix, np.uint8), targets=(suffix, np.uint8))
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(UserError, match=message):
        image_folder(seed=0, path=str(root), val_path=str(root))
