"""Built-in models. Add your own with `@MODELS.register("name")` or a `package.module:Name` target."""

from torch import nn

from .registry import Registry

MODELS = Registry("model")


@MODELS.register("mlp")
class MLP(nn.Sequential):
    """Fully connected network on flattened inputs.

    in_features: size of one flattened input; out_features: size of the output;
    hidden_sizes: widths of the hidden layers; dropout: dropout after each hidden activation.
    """

    def __init__(self, in_features: int, out_features: int, hidden_sizes=(256, 256), dropout: float = 0.0):
        layers = [nn.Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


@MODELS.register("conv_autoencoder")
class ConvAutoencoder(nn.Module):
    """Small convolutional encoder-decoder for image-to-image reconstruction.

    The network predicts a correction that is added to its input (residual learning), which is what
    restoration tasks need: the output starts as the degraded input and learns to clean it.
    in_channels/out_channels: image channels; base_channels: width of the first level, doubled per level;
    depth: number of down/up-sampling levels (image sides must be divisible by 2**depth);
    dropout: channel dropout in the bottleneck.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 8, depth: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.residual = in_channels == out_channels
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.stem = _conv_block(in_channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1), nn.GELU(),
                          _conv_block(widths[i + 1], widths[i + 1]))
            for i in range(depth)
        )
        self.bottleneck_dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2), nn.GELU(),
                          _conv_block(widths[i], widths[i]))
            for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        skips = []
        for down in self.down:
            skips.append(h)
            h = down(h)
        h = self.bottleneck_dropout(h)
        for up in self.up:
            h = up(h) + skips.pop()
        out = self.head(h)
        return x + out if self.residual else out


def _conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GELU())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "MLP", "ConvAutoencoder", "count_parameters"]
