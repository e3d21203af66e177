"""Write the tiny example data files that the configs in `configs/own_*.yaml` train on.

    python scripts/make_example_data.py                 # into examples/data/
    python scripts/make_example_data.py --out DIR       # anywhere else

Two `.npz` files, the format `data.name: tensor_files` reads (an `inputs` and a `targets` array with the
samples along the first dimension), and a folder of PNG images, the layout `data.name: image_folder` reads,
about 230 KB together:

- `images.npz`: inputs 80 blurred, noisy 1x16x16 images (float32), targets the clean images (float32 in
  [0, 1]); for `own_images_reconstruction.yaml` and `own_model.yaml`.
- `features.npz`: inputs 300 vectors of 16 features (float32), targets class labels 0, 1, 2 (int64); for
  `own_data_classification.yaml`.
- `image_folder/`: the images of `images.npz` as 8-bit grey-scale PNGs, `inputs/000.png` ... and
  `targets/000.png` ...; for `own_image_folder.yaml`. Written with Pillow (the `images` extra:
  `pip install -e '.[images]'`); without it the folder is skipped, with a note.

The files are the same, byte for byte, on every run (fixed seed, fixed zip timestamps), so they need not be
committed (NumPy does not promise the same random numbers across its versions: regenerate after upgrading). To train on your own data, write your arrays the same way:

    numpy.savez("my_data.npz", inputs=x, targets=y)

and point `data.path` at that file (see "Your own data in three steps" in README.md).
"""

import argparse
import os
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "examples" / "data"
SEED = 0
IMAGE_COUNT, IMAGE_SIZE = 80, 16  # sides divisible by 4: conv_autoencoder's default depth 2 halves them twice
FEATURE_COUNT, FEATURE_DIM, CLASS_COUNT = 300, 16, 3


def make_images(rng):
    """Clean images: a few soft Gaussian blobs each; measurements: those blurred (3x3 box) plus noise."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    clean = np.zeros((IMAGE_COUNT, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for image in clean:
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(2, IMAGE_SIZE - 2, size=2)
            radius, brightness = rng.uniform(1.5, 4.0), rng.uniform(0.4, 1.0)
            image[0] += brightness * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    clean = np.clip(clean, 0.0, 1.0)
    padded = np.pad(clean, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    blurred = sum(padded[..., dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] for dy in range(3) for dx in range(3)) / 9
    noisy = blurred + rng.normal(0.0, 0.05, size=blurred.shape)
    return {"inputs": noisy.astype(np.float32), "targets": clean}


def make_features(rng):
    """Three Gaussian clusters in 16 dimensions, one per class."""
    centers = rng.normal(0.0, 0.7, size=(CLASS_COUNT, FEATURE_DIM))
    labels = rng.integers(0, CLASS_COUNT, size=FEATURE_COUNT)
    features = centers[labels] + rng.normal(0.0, 1.0, size=(FEATURE_COUNT, FEATURE_DIM))
    return {"inputs": features.astype(np.float32), "targets": labels.astype(np.int64)}


def save_npz(path, arrays):
    """What `numpy.savez` writes, but with fixed zip timestamps (savez stamps the current time), so the
    same arrays give the same bytes; written to a temporary name and renamed, so a reader never sees half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def save_png_folder(path, arrays):
    """`arrays` (inputs and targets in [0, 1], N x 1 x H x W) as 8-bit PNGs in `path/inputs` and `path/targets`,
    file names 000.png ...; each file written to a temporary name and renamed."""
    from PIL import Image

    for name, images in arrays.items():
        folder = path / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(np.round(np.clip(images[:, 0], 0, 1) * 255).astype(np.uint8)):
            target = folder / f"{index:03d}.png"
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, target)


def pillow_missing():
    try:
        import PIL  # noqa: F401
    except ImportError:
        return True
    return False


# file name -> (what makes its arrays, its random stream, how they are written). One generator per file, so
# changing one file's recipe leaves the other files' bytes alone (the image folder holds images.npz's images).
FILES = {"images.npz": (make_images, 1, save_npz), "features.npz": (make_features, 2, save_npz),
         "image_folder": (make_images, 1, save_png_folder)}


def write_example_data(out=DEFAULT_OUT):
    """Write every example file into `out` (the image folder only where Pillow is installed); returns their
    paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (make, stream, save) in FILES.items():
        if save is save_png_folder and pillow_missing():
            print(f"skipped {out / name}: writing PNGs needs Pillow (pip install -e '.[images]')")
            continue
        save(out / name, make(np.random.default_rng([SEED, stream])))
        written.append(out / name)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder to write into (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for path in write_example_data(args.out):
        size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"wrote {path} ({size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
