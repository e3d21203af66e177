"""Augmentation of image samples: a random crop and a random horizontal flip, the same for an input and its target.

The random draws of a sample come from a generator of its own, derived from (seed, epoch, sample index), so an
augmented sample does not depend on how many DataLoader workers there are, which worker reads it, or in what
order: a run resumed in the middle of an epoch draws exactly what the uninterrupted run drew. The global RNGs
are never touched.
"""

import torch

from . import seeded_generator


class PairAugment:
    """Crop and flip for the training split (random) or the validation split (a center crop, no flip).

    Called with the tensors of one sample (`C x H x W` images of equal height and width: an input and its
    target, or an input alone), it returns them cropped at the same place and flipped or not together.
    """

    def __init__(self, seed: int, crop: int | None = None, flip: bool = False, train: bool = True) -> None:
        self.seed, self.crop, self.flip, self.train = seed, crop, flip and train, train

    def __bool__(self) -> bool:
        return self.crop is not None or self.flip

    def __call__(self, images: list[torch.Tensor], epoch: int, index: int) -> list[torch.Tensor]:
        height, width = images[0].shape[-2:]
        generator = seeded_generator(self.seed, f"image_folder/augment/{epoch}/{index}") if self.train else None
        if self.crop is not None:
            top, left = self._corner(height, width, generator)
            images = [image[..., top : top + self.crop, left : left + self.crop] for image in images]
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            images = [image.flip(-1) for image in images]
        return [image.contiguous() for image in images]

    def _corner(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int]:
        """The top-left corner of the crop: drawn uniformly on the training split, the center on validation."""
        spare_h, spare_w = height - self.crop, width - self.crop  # type: ignore[operator]
        if generator is None:
            return spare_h // 2, spare_w // 2
        top = int(torch.randint(0, spare_h + 1, (), generator=generator))
        left = int(torch.randint(0, spare_w + 1, (), generator=generator))
        return top, left
