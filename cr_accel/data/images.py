"""image_folder: the user's own images (PNG, JPEG, TIFF) in folders, listed at build and decoded lazily.

Unlike the builders that load everything at construction, image_folder keeps file names: an image is decoded
in `__getitem__`, so in the DataLoader's workers when `data.num_workers` > 0, and a folder larger than memory
trains as well as a small one. What can be wrong with the files is still found at build, before training
starts: the layout, the pairing of inputs and targets, every file's header (format, size, channels, bit depth)
and one fully decoded file per folder. Random crops and flips (`transforms.py`) depend only on
(seed, epoch, sample index): the epoch reaches the workers through a shared-memory tensor (`set_epoch`).
"""

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cr_accel.errors import UserError

from . import DATASETS, DatasetSplits
from .image_files import SUFFIXES, SUPPORTED_TEXT, ImageHeader, decode_image, read_header, scaled
from .splits import ratio_problems, split_counts, split_indices
from .transforms import PairAugment

PAIRED = ("inputs", "targets")  # the subfolders of paired data


@DATASETS.register("image_folder")
def image_folder(seed, path, val_path=None, val_ratio=0.1, crop=None, flip=False, data_range=None,
                 test_path=None, test_ratio=None):
    """Your own images in a folder: pairs of input and target images, or images sorted into class folders.

    `path` holds either `inputs/` and `targets/` subfolders (reconstruction: `inputs/x.png` is matched with the
    target of the same file name without extension, e.g. `targets/x.tif`), or one subfolder per class
    (classification: the classes sorted by folder name get labels 0..K-1, listed in `metadata["classes"]`).
    PNG and JPEG are read with Pillow, TIFF with tifffile: 8-bit images are scaled to [0, 1], 16-bit ones
    divided by 65535, floating-point TIFFs kept as stored; a sample is a `C x H x W` float32 tensor (1 channel
    for grayscale, 3 for RGB, as stored for TIFF). Every image of a folder has the same channels and bit depth,
    and the same size unless `crop` is set. Other files are ignored.

    Args:
        path: the folder with the training data (or all the data, if `val_path` is not given). Relative paths
            are relative to the working directory.
        val_path: a folder with the validation data, laid out like `path` (its classes among those of `path`).
            If not given, the images at `path` are split at random (default: none).
        val_ratio: without `val_path`, the fraction of samples held out for validation, in (0, 1); the split
            is shuffled with the run's seed, so it is the same on every resume (default 0.1).
        crop: train on random `crop x crop` crops, the same for an input and its target, and validate on the
            center crop; images may then differ in size, as long as each is at least `crop` pixels high and wide
            (default: none, whole images).
        flip: flip training samples (input and target together) horizontally at random (default false).
        data_range: `[low, high]` of the targets, which `psnr` and `ssim` measure against. By default [0, 1] for
            8- and 16-bit targets; for floating-point targets the range observed in the training targets, which
            costs one pass over those files at start: giving it here saves that pass (default: none).
        test_path: a folder with test data, laid out like `path`, scored once after training (default: none).
        test_ratio: instead of `test_path`, the fraction of the images at `path` held out as the test set, in
            (0, 1): from the same seeded shuffle as the validation split, after it, so the sets are disjoint and
            adding a test split leaves validation as it was (default: none, no test set).
    """
    ratios, problems = ratio_problems(val_ratio, val_path, test_ratio, test_path)
    problems += _option_problems(crop, flip, data_range)
    if problems:
        raise UserError("; ".join(problems))
    root = _folder(path, "data.path")
    layout, samples, classes = _read_layout(root, "data.path")
    reference = _check_images(layout, samples, crop)
    train_index, held_index = split_indices(len(samples), ratios, seed, "image_folder/split", path)
    train = [samples[i] for i in train_index.tolist()]
    # {split: (samples, folder or None, how it was made)}
    sets = {name: ([samples[i] for i in index.tolist()], None, {f"{name}_ratio": float(ratios[name]), "seed": seed})
            for name, index in held_index.items()}
    for name, where in (("val", val_path), ("test", test_path)):
        if name not in sets and where is not None:
            folder = _folder(where, f"data.{name}_path")
            held = _held_out_samples(folder, f"data.{name}_path", layout, classes, root)
            _check_images(layout, held, crop, reference)
            sets[name] = (held, folder, f"{name}_path")
    val, val_root, split = sets["val"]
    test, test_root, test_split = sets.get("test", (None, None, None))

    paired = layout == "paired"
    metadata = {
        "dataset": "image_folder",
        "task": "reconstruction" if paired else "classification",
        **({} if paired else {"num_classes": len(classes), "classes": classes}),
        "input_shape": _sample_shape(reference[0], crop),
        "target_shape": _sample_shape(reference[1], crop) if paired else [],
        "input_dtype": "float32",
        "target_dtype": "float32" if paired else "int64",
        **split_counts(train, val, test),
        "data_range": _data_range(reference[1], train, data_range) if paired else None,
        "normalization": None,  # per-channel statistics would need every image decoded at build
        "source": {
            "path": str(root),
            "val_path": str(val_root) if val_root else None,
            "split": split,
            **({"test_path": str(test_root) if test_root else None, "test_split": test_split} if test else {}),
            "layout": "inputs/targets" if paired else "class folders",
            "stored": {"inputs": reference[0].dtype, **({"targets": reference[1].dtype} if paired else {})},
            "crop": crop,
            "flip": bool(flip),
        },
    }
    stored = (reference[0].dtype, reference[1].dtype if paired else None)
    return DatasetSplits(
        train=ImageFolderDataset(train, paired, PairAugment(seed, crop, flip, train=True), stored),
        val=ImageFolderDataset(val, paired, PairAugment(seed, crop, flip, train=False), stored),
        metadata=metadata,
        test=ImageFolderDataset(test, paired, PairAugment(seed, crop, flip, train=False), stored) if test else None,
    )


class ImageFolderDataset(Dataset):
    """(input, target) pairs decoded from files on each `__getitem__`: the target an image, or a class label.

    `set_epoch(epoch)` (called by the trainer every epoch) sets the epoch the augmentation draws for, in a
    shared-memory tensor, so DataLoader workers started before it, persistent ones included, see it too.

    `stored` is the dtype the input and target images are stored in (None for class labels): 8-bit images can
    be handed over from the workers as uint8 (`compact_item`) and scaled once a batch arrives (`expand_batch`);
    see `handover.py`.
    """

    def __init__(self, samples: list[tuple[Path, Path | int]], paired: bool, augment: PairAugment,
                 stored: tuple[str, str | None] = ("float32", None)) -> None:
        self.inputs = [str(s[0]) for s in samples]
        self.stored = stored
        self.has_compact_items = "uint8" in stored
        self.paired = paired
        self.targets = [str(s[1]) for s in samples] if paired else torch.tensor([s[1] for s in samples])
        self.augment = augment
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._item(index, keep_8_bit=False)

    def compact_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample with its 8-bit images as stored (uint8); `expand_batch` of a batch of them is the batch of
        `__getitem__`'s, bit for bit."""
        return self._item(index, keep_8_bit=True)

    def expand_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of `compact_item`s as a batch of `__getitem__`s: the 8-bit sides scaled, the others as given."""
        return self._expanded(inputs, 0), self._expanded(targets, 1) if self.paired else targets

    def _expanded(self, batch: torch.Tensor, side: int) -> torch.Tensor:
        return scaled(batch, "uint8") if self.stored[side] == "uint8" else batch

    def _item(self, index: int, keep_8_bit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images = [decode_image(Path(self.inputs[index]), keep_8_bit)]
        if self.paired:
            images.append(decode_image(Path(self.targets[index]), keep_8_bit))
        if self.augment:  # crops and flips move values, so they commute with the scaling
            images = self.augment(images, int(self.epoch), index)
        return (images[0], images[1]) if self.paired else (images[0], self.targets[index])


# ---------------------------------------------------------------- listing


def _folder(path, field):
    if path is None or not isinstance(path, (str, Path)) or str(path) == "":
        raise UserError(f"{field} must be a path to a folder of images, got {path!r}")
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise UserError(f"{field} `{path}` does not exist (looked for {resolved}); check the path in your config")
    if not resolved.is_dir():
        raise UserError(f"{field} `{path}` is a file; data.name=image_folder reads a folder holding `inputs/` and "
                        "`targets/` subfolders, or one subfolder of images per class")
    return resolved


def _listing(folder):
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "nothing"


def _images_in(folder, fix):
    """The images of `folder` in sorted name order (hidden files and other extensions left out)."""
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith("."))
    if not files:
        raise UserError(f"`{folder}` has no images ({SUPPORTED_TEXT}; it holds: {_listing(folder)}); {fix}")
    return files


def _read_layout(root, field):
    """("paired", [(input, target)], None), or ("classes", [(image, label)], class names): one file listing."""
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if set(PAIRED) & set(folders):
        missing = [name for name in PAIRED if name not in folders]
        if missing:
            raise UserError(f"{field} `{root}` has a `{PAIRED[missing[0] == 'inputs']}/` folder but no "
                            f"`{missing[0]}/` folder; paired data needs both, with files of the same name "
                            "(e.g. inputs/0001.png and targets/0001.png)")
        return "paired", _pairs(root), None
    if not folders:
        raise UserError(f"{field} `{root}` holds no image folders (it holds: {_listing(root)}); image_folder needs "
                        "`inputs/` and `targets/` subfolders (paired images) or one subfolder of images per class")
    samples = [(file, label) for label, name in enumerate(folders)
               for file in _images_in(root / name, "add images of that class or remove the empty class folder")]
    return "classes", samples, folders


def _by_stem(folder):
    files = {}
    for file in _images_in(folder, f"add the images, named like those in the other folder of `{folder.parent}`"):
        if file.stem in files:
            raise UserError(f"`{folder}` has two images named `{file.stem}` (`{files[file.stem].name}` and "
                            f"`{file.name}`); inputs and targets are matched by name without extension: rename one")
        files[file.stem] = file
    return files


def _pairs(root):
    found = {name: _by_stem(root / name) for name in PAIRED}
    for name, other in (PAIRED, PAIRED[::-1]):
        unmatched = [found[name][stem].name for stem in sorted(found[name]) if stem not in found[other]]
        if unmatched:
            shown = ", ".join(unmatched[:3]) + (f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else "")
            raise UserError(f"{len(unmatched)} image(s) in `{root / name}` have no {other[:-1]} of the same name in "
                            f"`{root / other}`: {shown}; inputs and targets are matched by file name without "
                            f"extension: add the missing {other} or remove those {name}")
    inputs, targets = found["inputs"], found["targets"]
    return [(inputs[stem], targets[stem]) for stem in sorted(inputs)]


def _held_out_samples(folder, field, layout, classes, root):
    """The samples at data.val_path or data.test_path (`field`), laid out like data.path; class labels are those
    of data.path's classes."""
    held_layout, samples, held_classes = _read_layout(folder, field)
    what = "validation" if field == "data.val_path" else "test"
    if held_layout != layout:
        kinds = {"paired": "`inputs/` and `targets/` folders", "classes": "class folders"}
        raise UserError(f"{field} `{folder}` holds {kinds[held_layout]} but data.path `{root}` holds "
                        f"{kinds[layout]}; lay the {what} data out like the training data")
    if layout == "paired":
        return samples
    unknown = [name for name in held_classes if name not in classes]
    if unknown:
        raise UserError(f"{field} `{folder}` has class folder(s) {', '.join(unknown)} that data.path "
                        f"`{root}` lacks (its classes: {', '.join(classes)}); {what} classes must be training "
                        "classes: rename or remove those folders")
    return [(file, classes.index(held_classes[label])) for file, label in samples]


# ---------------------------------------------------------------- checks of the files


def _check_images(layout, samples, crop, reference=None):
    """Check every image's header and decode the first of each folder; returns the (input, target) headers that
    the rest (and the validation images) were compared with (target None for classes)."""
    if layout == "paired":
        inputs = _check_folder([s[0] for s in samples], crop, reference and reference[0])
        targets = _check_folder([s[1] for s in samples], crop, reference and reference[1])
        if crop is not None:
            for a, b in zip(inputs, targets):
                if (a.height, a.width) != (b.height, b.width):
                    raise UserError(f"`{a.file}` is {a.size_text} but its target `{b.file}` is {b.size_text}; with "
                                    "data.crop an input and its target must be the same size (one crop is cut from "
                                    "both): resize one of them")
        return inputs[0], targets[0]
    first = reference[0] if reference else None
    for label in sorted({s[1] for s in samples}):
        headers = _check_folder([s[0] for s in samples if s[1] == label], crop, first)
        first = first or headers[0]
    return first, None


def _check_folder(files, crop, reference=None):
    """The headers of one folder's images, all like `reference` (else the first): channels and bit depth, and
    size unless `crop` is set, when each must be at least crop x crop. The first file is decoded, so a corrupt
    one shows now; the others are only opened for their headers."""
    headers = [read_header(file) for file in files]
    decode_image(files[0])
    reference = reference or headers[0]
    for header in headers:
        if (header.channels, header.dtype) != (reference.channels, reference.dtype):
            raise UserError(f"`{header.file}` is {header.kind} but `{reference.file}` is {reference.kind}; all "
                            f"images of a folder (and of the validation data) need the same channels and bit "
                            f"depth: convert it to {reference.kind}")
        if crop is None and (header.height, header.width) != (reference.height, reference.width):
            raise UserError(f"`{header.file}` is {header.size_text} but `{reference.file}` is "
                            f"{reference.size_text}; all images of a folder (and of the validation data) need one "
                            "size: resize it, or set data.crop to train on crops")
        if crop is not None and min(header.height, header.width) < crop:
            raise UserError(f"`{header.file}` is {header.size_text}, smaller than data.crop={crop}: set data.crop "
                            f"to at most {min(header.height, header.width)}, or remove the image")
    return headers


def _option_problems(crop, flip, data_range):
    problems = []
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
        problems.append(f"data.crop must be a whole number of pixels >= 1 (or null for whole images), got {crop!r}")
    if not isinstance(flip, bool):
        problems.append(f"data.flip must be true or false, got {flip!r}")
    if data_range is not None and not is_range(data_range):
        problems.append(f"data.data_range must be [low, high] with low < high, got {data_range!r}")
    return problems


def is_range(value):
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    return numbers and value[0] < value[1]


# ---------------------------------------------------------------- metadata


def _sample_shape(header: ImageHeader, crop: int | None) -> list[int]:
    return [header.channels, crop, crop] if crop is not None else [header.channels, header.height, header.width]


def _data_range(target: ImageHeader, train, given):
    """[low, high] of the targets: given, or [0, 1] for scaled integer images, or observed in the training
    targets (the one pass over files at build, for floating-point targets only)."""
    if given is not None:
        return [float(given[0]), float(given[1])]
    if target.integer:
        return [0.0, 1.0]
    low, high = math.inf, -math.inf
    for _, file in train:
        image = decode_image(file)
        if not bool(torch.isfinite(image).all()):
            raise UserError(f"`{file}` holds NaN or infinite values: clean the targets (e.g. numpy.nan_to_num), or "
                            "remove the image")
        low, high = min(low, float(image.min())), max(high, float(image.max()))
    return [low, high]
