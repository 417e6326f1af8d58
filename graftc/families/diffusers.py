"""diffusers denoisers (DiTTransformer2DModel, PixArtTransformer2DModel, ... from a save_pretrained or pipeline
folder): loading with example inputs built from the config, and teacher-sampled distillation data with the
pipeline's own scheduler."""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from graftc.diffusion import guided_eps
from graftc.distill.data import Batch, DiffusionTask, generator
from graftc.errors import GraftError
from graftc.families import example
from graftc.families.example import evaluate  # noqa: F401  (graftc eval: agreement only, so far)
from graftc.loaded import Loaded, from_pretrained

MAKES_IMAGES = True


def load(path: Path, config: dict) -> Loaded:
    """The diffusers model class the folder's config names, with small example inputs built from the config."""
    import diffusers  # heavy: only for the models that need it

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise GraftError(f"{path}: '{name}' is not a diffusers model class")
    model = from_pretrained(cls, path)
    return Loaded("", model, (), example_kwargs(model), family="diffusers")


def example_kwargs(model) -> dict:
    """Small inputs a diffusers denoiser accepts, built from its config and forward signature."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    size = cfg.get("sample_size") or 8
    size = size if isinstance(size, int) else size[0]
    kwargs: dict[str, Any] = {"hidden_states": torch.randn(1, cfg.get("in_channels", 4), size, size),
                              "timestep": torch.tensor([500])}
    if "encoder_hidden_states" in params:
        width = cfg.get("caption_channels") or cfg.get("cross_attention_dim") or cfg.get("joint_attention_dim")
        if width:
            kwargs["encoder_hidden_states"] = torch.randn(1, 8, width)
    if "class_labels" in params and cfg.get("num_embeds_ada_norm"):
        kwargs["class_labels"] = torch.tensor([0])
    if "added_cond_kwargs" in params:
        extra = cfg.get("use_additional_conditions")
        kwargs["added_cond_kwargs"] = ({"resolution": torch.tensor([[size * 8.0, size * 8.0]]),
                                        "aspect_ratio": torch.tensor([[1.0]])} if extra
                                       else {"resolution": None, "aspect_ratio": None})
    return kwargs


class DiffusersTask(DiffusionTask):
    """diffusers denoisers (DiTTransformer2DModel, PixArtTransformer2DModel, ...) with a diffusers scheduler:
    the pipeline's own scheduler config where the model came from a pipeline folder, else DDIM defaults."""

    name = "diffusers"

    def __init__(self, loaded, data, seed):
        super().__init__(loaded, data, seed)
        cfg = loaded.model.config
        self.channels = cfg.get("in_channels", 4)
        size = cfg.get("sample_size") or 8
        self.size = size if isinstance(size, int) else size[0]
        self.classes = cfg.get("num_embeds_ada_norm") if "class_labels" in loaded.kwargs else None
        self.text = "encoder_hidden_states" in loaded.kwargs
        self.prompts = self._prompts() if self.text else None
        self.scheduler = self._scheduler()
        self.alphas_cumprod = self.scheduler.alphas_cumprod

    def _prompts(self) -> dict[str, torch.Tensor]:
        if not self.data.prompt_embeds:
            raise GraftError("data.prompt_embeds: this text-conditional model needs caption embeddings (a "
                             "safetensors file with prompt_embeds [P, L, C]); graftc does not run text encoders")
        path = Path(self.data.prompt_embeds)
        if not path.is_file():
            raise GraftError(f"data.prompt_embeds: file not found: {path}")
        embeds = load_file(str(path))
        if "prompt_embeds" not in embeds or embeds["prompt_embeds"].dim() != 3:
            raise GraftError(f"data.prompt_embeds: {path} must hold prompt_embeds [P, L, C] (has {sorted(embeds)})")
        return embeds

    def _scheduler(self):
        import diffusers  # heavy: only for the models that need it

        spec = Path(self.loaded.spec)
        for folder in (spec / "scheduler", spec.parent / "scheduler"):
            if (folder / "scheduler_config.json").is_file():
                config = diffusers.DDIMScheduler.load_config(str(folder))
                cls = getattr(diffusers, config.get("_class_name", ""), diffusers.DDIMScheduler)
                return cls.from_config(config)
        return diffusers.DDIMScheduler()

    label_key = "rows"  # _condition takes the class label as rows % classes

    def key_extra(self):
        return {"scheduler": dict(self.scheduler.config), "prompts": self.data.prompt_embeds}

    def image_spec(self, teacher):
        return (self.channels, self.size, self.size), (None if self.text else self.classes)

    def _condition(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        cond = {}
        if self.classes:
            cond["class_labels"] = rows % self.classes
        if self.text:
            cond["encoder_hidden_states"] = self.prompts["prompt_embeds"][rows % len(self.prompts["prompt_embeds"])]
            if "prompt_mask" in self.prompts:
                cond["encoder_attention_mask"] = self.prompts["prompt_mask"][rows % len(self.prompts["prompt_mask"])]
        return cond

    def _inputs(self, x, t, cond) -> dict:
        kwargs = {**self.loaded.kwargs, "hidden_states": x, "timestep": t, **cond}
        extra = kwargs.get("added_cond_kwargs")
        if isinstance(extra, dict):  # PixArt's micro-conditions: one row per sample
            kwargs["added_cond_kwargs"] = {k: (v.expand(len(x), *v.shape[1:]) if isinstance(v, torch.Tensor) else v)
                                           for k, v in extra.items()}
        return kwargs

    @torch.no_grad()
    def generate(self, teacher, rows):
        g = generator(self.seed, "samples", int(rows[0]))
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(self.data.sampler_steps)
        cond = self._condition(rows)
        guided = self.classes and self.data.cfg_scale != 1
        x = torch.randn(len(rows), self.channels, self.size, self.size, generator=g) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            tt = torch.full((len(rows),), int(t))
            if guided:  # class-conditional CFG: the null class is the extra embedding row
                eps = guided_eps(lambda x_, t_, y_: self.output(teacher(**self._inputs(x_, t_, {"class_labels": y_})))
                                 [:, : self.channels], inp, tt, cond["class_labels"], self.classes, self.data.cfg_scale)
            else:
                eps = self.output(teacher(**self._inputs(inp, tt, cond)))[:, : self.channels]
            x = scheduler.step(eps, t, x).prev_sample
        return {"x0": x.float(), "rows": rows}

    def make(self, index, g):
        x0, rows = self.samples["x0"][index], self.samples["rows"][index]
        t = torch.randint(self.scheduler.config.num_train_timesteps, (len(index),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return Batch((), self._inputs(x_t, t, self._condition(rows)), {"noise": noise, "t": t})


def task(loaded, data, seed: int):
    """A denoiser's task; a diffusers model that takes no noisy latents and timestep gets the generic one."""
    if "hidden_states" in loaded.kwargs and "timestep" in loaded.kwargs:
        return DiffusersTask(loaded, data, seed)
    return example.task(loaded, data, seed)
