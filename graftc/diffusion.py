"""DDPM training schedule and deterministic DDIM sampler for graftc's DiT (no diffusers dependency).

The schedule is DiT's: 1000 steps, betas linear from 1e-4 to 0.02, and the model predicts the noise
(epsilon). ``Diffusion.sample`` runs DDIM with eta = 0 (Song et al., 2021), so a given starting noise always
gives the same image. ``dit_eps`` turns a DiT plus class labels into the ``eps_fn(x_t, t)`` that ``loss`` and
``sample`` take, with classifier-free guidance; ``sample_dit`` draws clean samples for a list of labels.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from graftc.errors import GraftError
from graftc.progress import Progress

__all__ = ["Diffusion", "dit_eps", "guided_eps", "sample_dit"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Diffusion:
    """DiT's training schedule: linear betas 1e-4..0.02 over 1000 steps, epsilon prediction."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if num_timesteps < 1:
            raise GraftError(f"Diffusion: num_timesteps must be >= 1 (got {num_timesteps})")
        if not 0 < beta_start <= beta_end < 1:
            raise GraftError(f"Diffusion: need 0 < beta_start <= beta_end < 1 (got {beta_start}, {beta_end})")
        self.num_timesteps = int(num_timesteps)
        self.betas = torch.linspace(beta_start, beta_end, self.num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    # ------------------------------------------------------------ training
    def _coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(a_t), sqrt(1 - a_t) for int timesteps t [B], shaped to broadcast against ``like`` [B, ...]."""
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise GraftError(f"Diffusion: timesteps must be integers (got {t.dtype})")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise GraftError(f"Diffusion: timesteps must lie in [0, {self.num_timesteps}) "
                             f"(got {int(t.min())}..{int(t.max())})")
        a = self.alphas_cumprod[t.cpu().long()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        sa = a.sqrt().to(device=like.device, dtype=like.dtype).reshape(shape)
        s1a = (1.0 - a).sqrt().to(device=like.device, dtype=like.dtype).reshape(shape)
        return sa, s1a

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with a_t the cumulative product of (1 - beta); t int64 [B]."""
        if x0.shape != noise.shape:
            raise GraftError(f"Diffusion.add_noise: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ")
        sa, s1a = self._coeffs(t, x0)
        return sa * x0 + s1a * noise

    def sample_timesteps(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """n timesteps drawn uniformly from [0, T), int64, on ``device``."""
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def loss(self, eps_fn: EpsFn, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """MSE between eps_fn(x_t, t) and the noise that made x_t, at random t and noise (from ``generator``)."""
        t = self.sample_timesteps(x0.shape[0], generator, device=x0.device)
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        pred = eps_fn(self.add_noise(x0, noise, t), t)
        if pred.shape != x0.shape:
            raise GraftError(f"Diffusion.loss: eps_fn returned {tuple(pred.shape)} for inputs {tuple(x0.shape)}")
        return torch.mean((pred.float() - noise.float()) ** 2)

    # ------------------------------------------------------------ sampling
    def ddim_timesteps(self, steps: int) -> list[int]:
        """The ``steps`` evenly spaced timesteps DDIM visits, from T-1 down to 0."""
        if not 1 <= steps <= self.num_timesteps:
            raise GraftError(f"Diffusion.sample: steps must lie in [1, {self.num_timesteps}] (got {steps})")
        ts = torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        return ts

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, noise: torch.Tensor, steps: int = 25, progress: bool = False) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from x_T = ``noise`` to x_0 over ``steps`` evenly spaced timesteps.

        Each step predicts x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) and moves to the previous visited
        timestep along the same eps; the last step lands on x0 itself (a_prev = 1)."""
        ts = self.ddim_timesteps(steps)
        acp = self.alphas_cumprod
        x = noise
        shown = Progress("DDIM", len(ts), enabled=progress)
        for i, t in enumerate(ts):
            a_t = float(acp[t])
            a_prev = float(acp[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            t_batch = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
            eps = eps_fn(x, t_batch).to(x.dtype)
            x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
            x = a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps
            shown.update(i + 1)
        shown.close()
        return x


def guided_eps(predict, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null_class: int,
               cfg_scale: float) -> torch.Tensor:
    """`predict(x, t, labels)` with classifier-free guidance: eps_u + s (eps_c - eps_u), the conditional and the
    unconditional (every label the null class) halves evaluated in one batch; with s = 1, just predict(x, t, labels)."""
    if float(cfg_scale) == 1.0:
        return predict(x, t, labels)
    both = predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_class)]))
    cond, uncond = both.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def dit_eps(model, labels, cfg_scale: float = 1.0) -> EpsFn:
    """eps_fn(x_t, t) for graftc's DiT with class ``labels`` [B].

    With ``cfg_scale`` != 1 it applies classifier-free guidance, eps_u + s (eps_c - eps_u), evaluating the
    conditional and the unconditional (null class = ``model.num_classes``) halves in one batch. Only the first
    ``in_channels`` output channels are kept (learn_sigma models also predict the variance). Inputs are cast
    to the model's device and dtype; the result has the dtype and device of x_t."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    labels = torch.as_tensor(labels).to(device=device, dtype=torch.int64).reshape(-1)
    num_classes = int(model.num_classes)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise GraftError(f"dit_eps: labels must lie in [0, {num_classes}) (got {int(labels.min())}..{int(labels.max())})")
    channels = int(model.in_channels)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != labels.shape[0]:
            raise GraftError(f"dit_eps: batch of {x.shape[0]} inputs for {labels.shape[0]} labels")
        xin = x.to(device=device, dtype=dtype)
        tin = torch.as_tensor(t).to(device).reshape(-1).expand(x.shape[0])
        eps = guided_eps(lambda x_, t_, y_: model(x_, t_, y_)[:, :channels], xin, tin, labels, num_classes, cfg_scale)
        return eps.to(device=x.device, dtype=x.dtype)

    return eps_fn


@torch.no_grad()
def sample_dit(model, labels, steps: int = 25, cfg_scale: float = 1.0, generator: Optional[torch.Generator] = None,
               batch_size: int = 256, progress: bool = False, diffusion: Optional[Diffusion] = None) -> torch.Tensor:
    """Clean samples [N, C, H, W] for ``labels`` [N], drawn by DDIM in batches of ``batch_size``.

    The starting noise comes from ``generator`` (drawn on the generator's device, in float32, for all N at
    once), so a seeded generator gives the same samples whatever the batch size. Sampling runs on the
    model's device in float32 (float64 for a float64 model); the result is returned in that dtype. With
    ``progress``, a bar (in a log: lines) counts the samples done."""
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if batch_size < 1:
        raise GraftError(f"sample_dit: batch_size must be >= 1 (got {batch_size})")
    param = next(model.parameters())
    work = torch.float64 if param.dtype == torch.float64 else torch.float32
    diffusion = diffusion or Diffusion()
    s, c = int(model.input_size), int(model.in_channels)
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.randn((labels.shape[0], c, s, s), generator=generator, device=gen_device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    shown = Progress("sampling", labels.shape[0], unit="sample", enabled=progress)
    try:
        out = []
        for start in range(0, labels.shape[0], batch_size):
            y = labels[start:start + batch_size]
            x_T = noise[start:start + batch_size].to(device=param.device, dtype=work)
            out.append(diffusion.sample(dit_eps(model, y, cfg_scale), x_T, steps=steps))
            shown.update(start + len(y))
    finally:
        model.train(was_training)
        shown.close()
    if not out:
        return torch.empty((0, c, s, s), device=param.device, dtype=work)
    return torch.cat(out)
