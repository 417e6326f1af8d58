"""graftc's DiT (dit:CONFIG[:CHECKPOINT], demo:tiny-dit): loading, teacher-sampled distillation data, and the
demo's FD as its quality figure."""
from __future__ import annotations

import torch

from graftc.diffusion import Diffusion, sample_dit
from graftc.distill.data import Batch, DiffusionTask, generator
from graftc.metrics import fd_of_features, inception_score, precision_recall
from graftc.models.demo import demo_fd, load_demo_dit
from graftc.models.dit import build_dit, example_inputs, load_dit_checkpoint
from graftc.loaded import Loaded

MAKES_IMAGES = True


def load(rest: str) -> Loaded:
    """dit:CONFIG[:CHECKPOINT]: a DiT of a named configuration, random or with the checkpoint's weights."""
    config, _, checkpoint = rest.partition(":")
    model = build_dit(config)
    if checkpoint:
        load_dit_checkpoint(model, checkpoint)
    return Loaded("", model, example_inputs(model, batch_size=1), family="dit")


def load_demo() -> Loaded:
    """demo:tiny-dit: the committed pretrained weights (a clear GraftError if they are missing)."""
    model = load_demo_dit()
    return Loaded("", model, example_inputs(model, batch_size=1), family="dit")


class DiTTask(DiffusionTask):
    """graftc's DiT (demo:tiny-dit, dit:CONFIG): graftc.diffusion's DDPM schedule and DDIM sampler."""

    name = "dit"

    def __init__(self, loaded, data, seed):
        super().__init__(loaded, data, seed)
        self.diffusion = Diffusion()
        self.alphas_cumprod = self.diffusion.alphas_cumprod

    def image_spec(self, teacher):
        return (teacher.in_channels, teacher.input_size, teacher.input_size), teacher.num_classes

    def generate(self, teacher, rows):
        labels = rows % teacher.num_classes
        x0 = sample_dit(teacher, labels, steps=self.data.sampler_steps, cfg_scale=self.data.cfg_scale,
                        generator=generator(self.seed, "samples", int(rows[0])))
        return {"x0": x0.float().cpu(), "y": labels}

    def make(self, index, g):
        x0, y = self.samples["x0"][index], self.samples["y"][index]
        t = torch.randint(self.diffusion.num_timesteps, (len(index),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.diffusion.add_noise(x0, noise, t)
        return Batch((x_t, t, y), {}, {"noise": noise, "t": t})

    def quality(self, model):
        if not self.loaded.spec.startswith("demo:") or not self.data.fd_samples:
            return None
        return demo_fd(model, n=self.data.fd_samples, steps=self.data.sampler_steps, cfg_scale=self.data.cfg_scale,
                       seed=self.seed)


def task(loaded, data, seed: int) -> DiTTask:
    return DiTTask(loaded, data, seed)


@torch.no_grad()
def sample_quality(model, extractor, n: int, steps: int, cfg: float, seed: int) -> dict:
    """FD, sFID, IS, precision, recall of ``n`` class-balanced DDIM samples of a graftc DiT, with the features of
    ``extractor`` (a ``graftc.evaluate.features.FeatureExtractor``)."""
    labels = torch.arange(n) % int(model.num_classes)
    images = sample_dit(model, labels, steps=steps, cfg_scale=cfg, generator=torch.Generator().manual_seed(seed),
                        progress=True)
    images = images.float().clamp(-1, 1).cpu()
    ref = extractor.reference()
    feats = extractor.features(images)
    out = {"fd": fd_of_features(feats, ref["features"] if "features" in ref else (ref["mu"], ref["sigma"]))}
    spatial = extractor.spatial(images)
    if spatial is not None and ("spatial" in ref or "mu_s" in ref):
        out["sfid"] = fd_of_features(spatial, ref["spatial"] if "spatial" in ref else (ref["mu_s"], ref["sigma_s"]))
    logits = extractor.logits(images)
    if logits is not None:
        out["is"] = inception_score(logits)
    if "features" in ref and min(n, len(ref["features"])) > 3:  # k=3 neighbours need more rows on each side
        out["precision"], out["recall"] = precision_recall(ref["features"], feats, k=3)
    return out


def evaluate(run) -> bool:
    """graftc eval's figures for a DiT (`run`: a graftc.evaluate.run.Evaluation): each model's sample quality
    where a feature extractor is given and fits the model. Agreement on held-out task inputs applies too."""
    if run.extractor is None:
        return True
    why = run.extractor.fits(run.target["model"])
    if why is not None:
        run.result["notes"].append(f"sample quality skipped: {why}")
        return True
    for e in run.entries:
        run.log(f"eval: sampling {run.samples} images from {e['name']} ({run.steps} steps, cfg {run.cfg})")
        run.result["models"][e["name"]].update(sample_quality(e["model"], run.extractor, run.samples, run.steps,
                                                              run.cfg, run.seed))
    return True
