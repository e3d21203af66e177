"""The benchmark's workloads: one model, loss and in-memory data set each, shared by both variants.

The hand-written loop and cr_accel's Trainer build the same model class with the same arguments, the
same loss and the same tensors (generated from a seed), so the only difference between them is the
training loop itself. Importing this module costs nothing beyond torch: cr_accel is imported lazily.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import TensorDataset

SEED = 42
LR = 1e-3
WEIGHT_DECAY = 5e-3
WARMUP_RATIO = 0.05
GRAD_CLIP = 1.0


class SmallCNN(nn.Module):
    """A small image classifier: two conv stages with pooling, a third conv, global pooling, a linear head.

    With width 16 on 1x32x32 inputs, batch 32 and one thread, a training step takes about 27 ms on an unloaded
    machine of the benchmark's kind (25-38 ms on a Xeon, 72 ms on the shared 2-core VM): a compute-bound step,
    unlike the MLP's, where Python overhead is a large share.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@dataclass
class Workload:
    name: str
    model: str  # cr_accel model name (registered by the benchmark for `bench_cnn`)
    model_kwargs: dict
    batch_size: int
    input_shape: tuple
    num_classes: int
    default_steps: int  # optimizer steps per run in the default benchmark
    quick_steps: int
    steps_per_epoch: int
    num_val: int  # validation samples (one batch): validated once, after the last timed step
    loss: str = "cross_entropy"
    extra: dict = field(default_factory=dict)

    def model_class(self):
        if self.model == "mlp":
            from cr_accel.models import MLP  # the same class the Trainer builds from the name `mlp`

            return MLP
        return SmallCNN

    def build_model(self):
        return self.model_class()(**self.model_kwargs)

    def build_loss(self):
        return nn.CrossEntropyLoss()  # what cr_accel's `cross_entropy` returns with its defaults

    def datasets(self, seed=SEED):
        """(train, val) TensorDatasets of random inputs and class labels, the same for every variant."""
        g = torch.Generator().manual_seed(seed)
        n_train = self.steps_per_epoch * self.batch_size

        def split(n):
            x = torch.randn((n, *self.input_shape), generator=g)
            y = torch.randint(0, self.num_classes, (n,), generator=g)
            return TensorDataset(x, y)

        return split(n_train), split(self.num_val)


WORKLOADS = {
    "mlp": Workload(
        name="mlp", model="mlp",
        model_kwargs={"in_features": 64, "hidden_sizes": [256, 256], "out_features": 10},
        batch_size=64, input_shape=(64,), num_classes=10,
        default_steps=1000, quick_steps=60, steps_per_epoch=100, num_val=64,
    ),
    # Not in the default run: a model so small that the step is almost all Python, which shows the
    # loop's fixed cost per step in microseconds (`--workloads tiny`).
    "tiny": Workload(
        name="tiny", model="mlp",
        model_kwargs={"in_features": 8, "hidden_sizes": [8], "out_features": 2},
        batch_size=8, input_shape=(8,), num_classes=2,
        default_steps=3000, quick_steps=60, steps_per_epoch=100, num_val=8,
    ),
    "cnn": Workload(
        name="cnn", model="bench_cnn",
        model_kwargs={"in_channels": 1, "num_classes": 10, "width": 16},
        batch_size=32, input_shape=(1, 32, 32), num_classes=10,
        default_steps=100, quick_steps=8, steps_per_epoch=25, num_val=32,
    ),
}


def cosine_with_warmup(num_training_steps, num_warmup_steps):
    """LR factor for step `s` (0-based): linear warm-up, then a half cosine to 0 at the last step.

    The same curve as cr_accel's `cosine` schedule, written as the LambdaLR function people write by hand.
    """

    def factor(step):
        if step < num_warmup_steps:
            return (step + 1) / (num_warmup_steps + 1)
        span = max(1, num_training_steps - 1 - num_warmup_steps)
        progress = min(1.0, max(0.0, (step - num_warmup_steps) / span))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor
