"""graftc's own Inception-v3: the feature network behind FID, sFID and the Inception Score.

Plain ``torch.nn``, with the parameter and buffer names of the public weights (torchvision's ``Inception3``
naming, which pytorch-fid's ``pt_inception-2015-12-05-*.pth`` shares), so those files load as they are:
``Conv2d_1a_3x3.conv.weight``, ``Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}``, ...,
``Mixed_5b``..``Mixed_7c``, ``fc``. Nothing is downloaded; :func:`load_inception` reads a local file.

Two variants, told apart by the weights' classifier:

* ``fc`` with 1008 outputs: the TF Inception graph of 2015-12-05 that defines FID. It differs from the
  ImageNet network in its pools: the average pools inside the A, C and E blocks do not count padding, and the
  pool branch of the last E block (``Mixed_7c``) takes a 3x3 max pool.
* ``fc`` with 1000 outputs: torchvision's ImageNet ``Inception3`` (plain average pools everywhere).

``InceptionV3.forward(images)`` takes images in [-1, 1] (the range these weights were trained on), of any size,
with 1 or 3 channels (1 is repeated to 3), resizes them to 299x299 (bilinear, ``align_corners=False``, the FID
convention) and returns

* ``pool`` [N, 2048]: the global average pool after ``Mixed_7c`` (TF's ``pool_3``), the FID features;
* ``spatial`` [N, 2023]: the first 7 channels of the 17x17 map TF calls ``mixed_6/conv`` (the 1x1 branch of
  ``Mixed_6d``, after its ReLU), flattened in TF's height-width-channel order, the sFID features;
* ``logits`` [N, num_classes]: ``fc`` on the pooled features. The Inception Score takes the softmax over all
  of them, the 8 unused classes of the 1008-way FID network included (they get next to no probability).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graftc.errors import GraftError
from graftc.files import first_few, misfit, read_weights

__all__ = ["InceptionV3", "load_inception", "EXPECTED"]

EXPECTED = "an Inception-v3 state dict with torchvision/pytorch-fid key names"
FID_CLASSES, IMAGENET_CLASSES = 1008, 1000
SIZE = 299
SPATIAL_CHANNELS = 7  # sFID keeps 7 of the 192 channels: 7 * 17 * 17 = 2023 dims, a covariance that fits


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001, as in the TF graph) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | pool -> 1x1."""

    def __init__(self, cin: int, pool_features: int, pool: nn.Module):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1 = BasicConv(cin, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.pool = pool  # no parameters: the variant's choice does not touch the state dict
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(self.pool(x)),
        ], 1)


class BlockB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):
    """17x17 block with factorized 7x7 convs (1x7 and 7x1) on ``c7`` channels."""

    def __init__(self, cin: int, c7: int, pool: nn.Module):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1 = BasicConv(cin, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, **row)
        self.branch7x7_3 = BasicConv(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv(c7, 192, **row)
        self.pool = pool
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(self.pool(x)),
        ], 1)


class BlockD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv(cin, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block whose 3x3 branches end in a split pair (1x3 beside 3x1), concatenated."""

    def __init__(self, cin: int, pool: nn.Module):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.pool = pool
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(self.pool(x)),
        ], 1)


class InceptionV3(nn.Module):
    """Inception-v3 without the auxiliary classifier. ``fid`` picks the FID network's pools (default: when
    ``num_classes`` is 1008, as in the FID weights)."""

    def __init__(self, num_classes: int = FID_CLASSES, fid: bool | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.fid = num_classes == FID_CLASSES if fid is None else bool(fid)

        def avg():  # the FID graph averages over the valid pixels only at the borders
            return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=not self.fid)

        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32, avg())
        self.Mixed_5c = BlockA(256, 64, avg())
        self.Mixed_5d = BlockA(288, 64, avg())
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128, avg())
        self.Mixed_6c = BlockC(768, 160, avg())
        self.Mixed_6d = BlockC(768, 160, avg())
        self.Mixed_6e = BlockC(768, 192, avg())
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, avg())
        self.Mixed_7c = BlockE(2048, nn.MaxPool2d(3, stride=1, padding=1) if self.fid else avg())
        self.fc = nn.Linear(2048, num_classes)
        # He init keeps a randomly initialized network's activations O(1) through its 94 convs (tests use one)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """[N, 1 or 3, H, W] in [-1, 1] -> [N, 3, 299, 299] float32."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise GraftError(f"Inception-v3: expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[2:]) != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> dict:
        x = self.prepare(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(self, name)(x)
        # TF's mixed_6/conv is Mixed_6d's 1x1 branch; running it once more (1% of the FLOPs) keeps the blocks
        # plain. TF flattens height, width, channel: the same order lets published mu_s/sigma_s be used.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        for name in ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}


# ------------------------------------------------------------------ loading


def load_inception(path) -> InceptionV3:
    """The network in a local weights file, in eval mode, float32, on the CPU. The variant follows ``fc``:
    1008 classes = the FID network, 1000 = torchvision's ImageNet network. ``AuxLogits.*`` entries are dropped
    (the auxiliary classifier plays no part in the features), as are BatchNorm's ``num_batches_tracked``."""
    state = {k: v for k, v in read_weights(path, "Inception-v3 weights", (".pth", ".pt"), EXPECTED).items()
             if not k.startswith("AuxLogits.") and not k.endswith("num_batches_tracked")}
    fc = state.get("fc.weight")
    classes = int(fc.shape[0]) if fc is not None and fc.dim() == 2 and fc.shape[0] == IMAGENET_CLASSES else FID_CLASSES
    model = InceptionV3(classes)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected, mismatched = misfit(expected, state)
    mismatched = [f"{k} {got} (expected {want})" for k, got, want in mismatched]
    problems = [f"{len(items)} {what} ({first_few(items)})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", mismatched)) if items]
    if problems:
        raise GraftError(f"Inception-v3 weights {path} do not fit: {'; '.join(problems)}; expected {EXPECTED} "
                         f"(fc: [1008, 2048] for the FID network or [1000, 2048] for torchvision's)")
    model.load_state_dict(state, strict=False)  # every key checked above; only num_batches_tracked is left out
    return model.float().eval()
