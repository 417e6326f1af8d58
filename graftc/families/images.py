"""Image classifiers (family "image-classifier": transformers ViT/DeiT folders, timm models with a classifier
head): loading timm models, example images, and real images as distillation data.

Without `data.images`, the inputs are real images that need no download: scikit-learn's 8x8 digits, scaled to
the model's image size, repeated over its channels and normalized with the model's own mean and std (its folder's
preprocessor_config.json, or a timm model's pretrained_cfg; else 0.5 and 0.5, the ViT processors' default).
`data.images` names a safetensors file with x0 [N, C, H, W] already in the model's input space (and optionally
y [N] labels) instead.

The images are shuffled by the seed and their last fifth is held out for evaluation (`eval_batches`): neither
stage trains on it, nor validates on it, so `graftc eval` compares teacher and graft on images the graft never saw.
"""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from graftc.distill.data import Batch, Task, generator, read_tensors
from graftc.errors import GraftError, one_line, read_json
from graftc.families.example import evaluate  # noqa: F401  (graftc eval: agreement, top-1 from the task)
from graftc.files import check_fits, read_weights
from graftc.models.demo import load_digits_tensor
from graftc.loaded import Loaded, parse_options

MAKES_IMAGES = False
DEFAULT_MEAN_STD = (0.5, 0.5)
TEST_SHARE = 0.2  # of the images, held out for evaluation


def image_input(loaded) -> tuple[str | int, torch.Tensor]:
    """Where the loaded model takes its image (the `pixel_values` keyword, else the first positional argument)
    and the example image [1, C, H, W]."""
    if isinstance(loaded.kwargs.get("pixel_values"), torch.Tensor):
        return "pixel_values", loaded.kwargs["pixel_values"]
    if loaded.args and isinstance(loaded.args[0], torch.Tensor) and loaded.args[0].dim() == 4:
        return 0, loaded.args[0]
    raise GraftError(f"{loaded.spec}: no image input (pixel_values [B, C, H, W]) among the example inputs")


def normalization(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std the model's images are normalized with."""
    channels = image_input(loaded)[1].shape[1]
    (mean, std), where = DEFAULT_MEAN_STD, "the default"
    config = Path(loaded.spec) / "preprocessor_config.json"
    pretrained = getattr(loaded.model, "pretrained_cfg", None)  # timm models carry theirs
    if config.is_file():
        processor, where = read_json(config), str(config)
        mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
    elif isinstance(pretrained, dict) and "mean" in pretrained and "std" in pretrained:
        (mean, std), where = (pretrained["mean"], pretrained["std"]), "the timm model's pretrained_cfg"

    def per_channel(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32).flatten().expand(channels).reshape(channels, 1, 1)

    try:
        return per_channel(mean), per_channel(std)
    except (RuntimeError, TypeError, ValueError):
        raise GraftError(f"{where}: image_mean {mean!r} and image_std {std!r} do not fit the model's "
                         f"{channels} channels") from None


def digits_images(shape: tuple[int, int, int], mean: torch.Tensor, std: torch.Tensor):
    """scikit-learn's digits as (images [1797, C, H, W] in the model's input space, labels [1797])."""
    digits, labels = load_digits_tensor()  # [N, 1, 8, 8] in [-1, 1]
    channels, height, width = shape
    pixels = F.interpolate((digits + 1) / 2, size=(height, width), mode="bilinear", align_corners=False)
    return (pixels.expand(-1, channels, -1, -1) - mean) / std, labels


class ImageTask(Task):
    """Image classifiers: real images in, logits out; the distillation loss is KL(teacher || student) of the
    class distributions."""

    name = "images"
    classifies = True  # outputs are class logits: evaluation reports top-1 agreement

    def __init__(self, loaded, data, seed):
        super().__init__(loaded, data, seed)
        self.where, example = image_input(loaded)
        self.shape = tuple(example.shape[1:])
        self.source = data.images or "demo:digits"

    def prepare(self, teacher, log=print) -> None:
        where = f"data.images: {self.source}"
        if self.source == "demo:digits":
            x0, y = digits_images(self.shape, *normalization(self.loaded))
        elif self.source.startswith("demo:"):
            raise GraftError(f"{where}: unknown built-in data set (known: demo:digits)")
        else:
            x0, y = self._read(where)
        if len(x0) < 3:
            raise GraftError(f"{where}: {len(x0)} images are too few to hold out a test and a validation share")
        order = torch.randperm(len(x0), generator=generator(self.seed, "images"))
        images = {"x0": x0[order].contiguous(), **({"y": y[order].contiguous()} if y is not None else {})}
        fit = len(x0) - max(1, round(len(x0) * TEST_SHARE))
        self.samples = {k: v[:fit] for k, v in images.items()}
        self.test = {k: v[fit:] for k, v in images.items()}
        self._split()
        log(f"data: {len(x0)} images {list(self.shape)} from {self.source} ({len(x0) - fit} held out for evaluation)")

    def _read(self, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        tensors = read_tensors(self.source, where)
        x0, y = tensors.get("x0"), tensors.get("y")
        if x0 is None or x0.dim() != 4 or tuple(x0.shape[1:]) != self.shape:
            got = tuple(x0.shape) if x0 is not None else f"no x0 (has {sorted(tensors)})"
            raise GraftError(f"{where}: needs x0 [N, {', '.join(map(str, self.shape))}], the model's input "
                             f"(got {got})")
        if not x0.is_floating_point() or not torch.isfinite(x0).all():
            raise GraftError(f"{where}: x0 must hold finite floating-point pixels")
        if y is not None and (y.shape != (len(x0),) or y.is_floating_point() or int(y.min()) < 0):
            raise GraftError(f"{where}: y must be [N] non-negative integer labels, one per image")
        return x0.float(), (y.long() if y is not None else None)

    def make(self, index, g):
        return self._batch({k: v[index] for k, v in self.samples.items()})

    def eval_batches(self, size: int) -> list[Batch]:
        """The held-out test images in batches of `size` (never trained or validated on)."""
        n = len(self.test["x0"])
        return [self._batch({k: v[start:start + size] for k, v in self.test.items()}) for start in range(0, n, size)]

    def _batch(self, images: dict[str, torch.Tensor]) -> Batch:
        x = images["x0"]
        target = {"y": images["y"]} if "y" in images else {}
        if self.where == "pixel_values":
            static = {k: v for k, v in self.loaded.kwargs.items() if not isinstance(v, torch.Tensor)}
            return Batch((), {**static, "pixel_values": x}, target)
        return Batch((x, *self.loaded.args[1:]), dict(self.loaded.kwargs), target)

    def output(self, out):
        logits = getattr(out, "logits", None)
        return logits if logits is not None else super().output(out)

    def distill_loss(self, student, teacher, weights=None):
        return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                        reduction="batchmean")

    def labels_fit(self, model) -> bool:
        """Whether the images' labels are this classifier's classes (as many labels as it has outputs), so its
        top-1 accuracy on them means something."""
        if "y" not in self.test:
            return False
        classes = getattr(getattr(model, "config", None), "num_labels", None) or getattr(model, "num_classes", None)
        labels = torch.cat([self.samples["y"], self.test["y"]])
        return isinstance(classes, int) and int(labels.max()) + 1 == classes


def load_timm(rest: str) -> Loaded:
    """timm:NAME[:k=v,...]: timm.create_model(NAME, **kwargs), random or with checkpoint=PATH's weights; family
    image-classifier where it has a classifier head, else timm (the generic family)."""
    name, _, options = rest.partition(":")
    kwargs = parse_options(options, f"timm:{rest}")
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision failing inside timm's import
        raise GraftError(f"timm:{name}: timm cannot be imported ({one_line(exc, 120)}); "
                         "install timm with a torchvision that matches your torch") from None
    checkpoint = kwargs.pop("checkpoint", None)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise GraftError(f"timm: unknown model '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise GraftError(f"timm:{name}: bad constructor argument: {exc}") from None
    if checkpoint:
        state = read_weights(checkpoint, "checkpoint", suffixes=None)
        check_fits(model.state_dict(), state, "checkpoint", checkpoint)
        model.load_state_dict(state)
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    channels = getattr(getattr(patch_embed, "proj", None), "in_channels", 3)
    shape = (channels, *size) if size else tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    # a classifier (timm's ViTs, DeiTs, ... with a head) distills on images and is evaluated by top-1 agreement
    family = "image-classifier" if getattr(model, "num_classes", 0) else "timm"
    return Loaded("", model, (torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)),), family=family)


def image_kwargs(model, path: Path) -> dict | None:
    """Example `pixel_values` for a vision transformer (ViT, DeiT, BEiT, ...): one image of the config's
    num_channels x image_size, or None when the model does not take pixel_values or its config lacks the sizes."""
    config = model.config
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        return None
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if size is None or channels is None or getattr(config, "patch_size", None) is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if not all(isinstance(v, int) and v > 0 for v in (height, width, channels)):
        raise GraftError(f"{path}/config.json: image_size {size!r} and num_channels {channels!r} must be positive "
                         "integers (or image_size a [height, width] pair)")
    return {"pixel_values": torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(0))}


def task(loaded, data, seed: int) -> ImageTask:
    return ImageTask(loaded, data, seed)
