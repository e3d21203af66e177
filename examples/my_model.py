"""Your own model, trained by cr_accel without registering anything: `configs/own_model.yaml` names it as

    model:
      name: examples.my_model:TinyDenoiser   # package.module:ClassName, importable from where you run
      width: 16                              # every other key is a constructor argument

A model is any `torch.nn.Module`. The trainer calls `model(inputs)` on a batch of your data's inputs
and passes the output to the loss with the batch's targets, so the output must have the targets' shape
(for `mse`) or be class scores `(batch, classes)` (for `cross_entropy`). Nothing else is required: no base
class, no special methods. Before training starts, cr_accel checks the config's keys against
`__init__`'s signature, so a misspelled argument (`widht: 16`) is refused with a suggestion instead of
being ignored.

To use a copy of this file for your own project, put it in a package of yours (`my_project/models.py`)
and set `model.name: my_project.models:YourClass`. The module must be importable: `python train.py` puts
the repository root on the import path (so `examples.my_model` is found); for a package elsewhere, install
it or add the folder that holds `my_project/` to PYTHONPATH.
"""

from torch import nn


class TinyDenoiser(nn.Module):
    """A stack of 3x3 convolutions that predicts a correction added to its input (residual learning).

    Args:
        channels: image channels of the inputs and the outputs (1 for grey-scale, 3 for RGB).
        width: feature channels of the hidden convolutions.
        num_layers: hidden convolutions, each followed by a GELU; at least 1.
    """

    # Plain type-annotated keyword arguments with defaults: the YAML sets any of them, the rest keep these.
    def __init__(self, channels: int = 1, width: int = 16, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        layers = [nn.Conv2d(channels, width, 3, padding=1), nn.GELU()]
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, channels, 3, padding=1)
        # Start as the identity: the last layer's zero weights make the first output equal the input, so
        # training begins from "return the measurement" and only learns what to correct.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        # x: (batch, channels, height, width), any height and width (the convolutions keep the size).
        return x + self.head(self.body(x))
