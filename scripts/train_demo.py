#!/usr/bin/env python
"""Pretrain graftc's demo models on scikit-learn's bundled 8x8 digits (reproducible, CPU, no downloads).

  python scripts/train_demo.py --what features   # FD feature network + reference statistics (~1 min)
  python scripts/train_demo.py --what dit        # the tiny DiT teacher (demo:tiny-dit), then its FD table
  python scripts/train_demo.py --what all        # both, features first (the DiT's FD needs them)
  python scripts/train_demo.py --what eval       # only the FD table of existing weights (~2 min)

Writes into graftc/models/weights/ (or --out): digit-features.safetensors + digit-features.json and
tiny-dit.safetensors + tiny-dit.json. Every setting is an argparse default and is written into the JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftc.diffusion import Diffusion  # noqa: E402
from graftc.models.demo import (  # noqa: E402
    DigitFeatures, demo_fd, feature_stats, frechet_distance, load_digits_tensor, load_feature_net,
)
from graftc.models.dit import DIT_CONFIGS, _TINY_DEFAULTS, build_dit  # noqa: E402

# (steps, cfg_scale) settings whose FD is measured after training and recorded in tiny-dit.json.
FD_SETTINGS = [(25, 1.0), (10, 1.0), (50, 1.0), (25, 1.5), (25, 2.0), (25, 3.0)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["features", "dit", "eval", "all"], default="all",
                   help="eval: only redo the FD table of existing weights")
    p.add_argument("--out", type=Path, default=ROOT / "graftc" / "models" / "weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    # DiT
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4, help="cosine decay floor")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1, help="fraction of labels replaced by the null class")
    p.add_argument("--fd-n", type=int, default=1000)
    p.add_argument("--noise-floor-repeats", type=int, default=5)
    # feature network
    p.add_argument("--feat-epochs", type=int, default=40)
    p.add_argument("--feat-batch-size", type=int, default=64)
    p.add_argument("--feat-lr", type=float, default=2e-3)
    p.add_argument("--feat-holdout", type=float, default=0.2)
    return p.parse_args(argv)


def settings(args, keys):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in keys}


def environment():
    # the load average says whether timings were taken on a busy machine (2 threads want a load below ~1)
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------- feature network


def train_classifier(images, labels, args, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitFeatures()
    opt = torch.optim.AdamW(net.parameters(), lr=args.feat_lr, weight_decay=1e-4)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / args.feat_batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.feat_lr, total_steps=args.feat_epochs * steps_per_epoch)
    net.train()
    for _ in tqdm(range(args.feat_epochs), desc="features", leave=False):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, args.feat_batch_size):
            idx = perm[i:i + args.feat_batch_size]
            x = images[idx]
            # light augmentation: +-1 pixel shifts (zero padded, i.e. background -1), keeps digits recognisable
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), shifts=(dy, dx), dims=(2, 3))[..., 1:9, 1:9]
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net, images, labels):
    return float((net(images).argmax(1) == labels).float().mean())


def train_features(args):
    images, labels = load_digits_tensor()
    n = images.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    n_test = int(round(n * args.feat_holdout))
    test, train = perm[:n_test], perm[n_test:]
    t0 = time.time()
    held = train_classifier(images[train], labels[train], args, args.seed)
    holdout_acc = accuracy(held, images[test], labels[test])
    print(f"feature net: held-out accuracy {holdout_acc:.4f} ({n_test} images, trained on {n - n_test})")
    net = train_classifier(images, labels, args, args.seed)  # the committed weights see every image
    train_acc = accuracy(net, images, labels)
    mu, sigma = feature_stats(images, net)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    state["ref_mu"] = torch.from_numpy(mu)
    state["ref_sigma"] = torch.from_numpy(sigma)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "model": "graftc.models.demo.DigitFeatures", "dataset": "sklearn load_digits, all 1797"}
    save_file(state, str(args.out / "digit-features.safetensors"), metadata=meta)
    (args.out / "digit-features.safetensors").chmod(0o644)
    report = {
        "settings": settings(args, {"seed", "feat_epochs", "feat_batch_size", "feat_lr", "feat_holdout"}),
        "holdout_accuracy": holdout_acc,
        "holdout_images": n_test,
        "train_accuracy_final_weights": train_acc,
        "reference": {"images": n, "trace_sigma": float(np.trace(sigma)), "norm_mu": float(np.linalg.norm(mu))},
        "seconds": round(time.time() - t0, 1),
        "environment": environment(),
    }
    (args.out / "digit-features.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"feature net: wrote {args.out / 'digit-features.safetensors'} (final train accuracy {train_acc:.4f})")
    return report


# ---------------------------------------------------------------- DiT


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def train_dit(args):
    if not (args.out / "digit-features.safetensors").is_file():
        raise SystemExit("train the feature network first: --what features (or --what all)")
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensor()
    n = images.shape[0]
    model = build_dit("tiny")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = Diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    null = model.num_classes
    losses = []
    model.train()
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="tiny DiT", mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        x0, y = images[idx], labels[idx]
        drop = torch.rand(args.batch_size, generator=g) < args.label_dropout
        y = torch.where(drop, torch.full_like(y, null), y)
        loss = diffusion.loss(lambda x, t: model(x, t, y), x0, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        with torch.no_grad():
            # EMA with a short warm start, so early averages are not dominated by the random init
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", lr=f"{lr_at(step, args):.1e}")
    train_seconds = time.time() - t0
    final_loss = float(np.mean(losses[-500:]))
    print(f"tiny DiT: {args.steps} steps in {train_seconds:.0f} s ({train_seconds / args.steps:.4f} s/step), "
          f"final loss (mean of last 500) {final_loss:.4f}")

    config = {**DIT_CONFIGS["tiny"]._asdict(), **_TINY_DEFAULTS, "mlp_ratio": 4.0}
    meta = {"format": "pt", "config": json.dumps(config), "name": "tiny", "weights": "EMA",
            "dataset": "sklearn load_digits scaled to [-1, 1]"}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tiny-dit.safetensors"
    save_file({k: v.detach().float().contiguous() for k, v in ema.state_dict().items()}, str(path), metadata=meta)
    path.chmod(0o644)
    print(f"tiny DiT: wrote {path}")

    report = {
        "model": {"name": "tiny", "config": config, "params": sum(p.numel() for p in model.parameters()),
                  "weights": "EMA, float32"},
        "settings": settings(args, {"seed", "steps", "batch_size", "lr", "min_lr", "warmup", "weight_decay",
                                    "grad_clip", "ema", "label_dropout"}),
        "schedule": {"num_timesteps": diffusion.num_timesteps, "betas": "linear 1e-4..0.02",
                     "prediction": "epsilon", "lr": "linear warmup then cosine to min_lr", "optimizer": "AdamW"},
        "data": {"dataset": "sklearn.datasets.load_digits", "images": n, "scaling": "pixels/8 - 1 -> [-1, 1]"},
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / args.steps, 4),
        "final_loss": round(final_loss, 5),
        "final_loss_is": "mean training loss (epsilon MSE) of the last 500 steps",
        "loss_curve": {str(s): round(float(np.mean(losses[max(0, s - 100):s + 1])), 5)
                       for s in list(range(0, args.steps, max(1, args.steps // 20))) + [args.steps - 1]},
        "environment": environment(),
    }
    (args.out / "tiny-dit.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def evaluate_dit(args):
    """FD of the saved teacher at several sampler settings, the data's noise floor and a random DiT's FD;
    merged into tiny-dit.json (so `--what eval` can redo it for existing weights)."""
    from graftc.models.demo import DEMO_CFG_SCALE, DEMO_STEPS, load_demo_dit, reference_stats

    path, feat_path, record = args.out / "tiny-dit.safetensors", args.out / "digit-features.safetensors", \
        args.out / "tiny-dit.json"
    teacher = load_demo_dit(path)  # from the file written: what users get
    net, ref = load_feature_net(feat_path), reference_stats(feat_path)
    images, _ = load_digits_tensor()
    n = images.shape[0]
    fd = []
    for steps, cfg in FD_SETTINGS:
        t1 = time.time()
        value = demo_fd(teacher, n=args.fd_n, steps=steps, cfg_scale=cfg, seed=0, net=net, ref=ref)
        fd.append({"steps": steps, "cfg_scale": cfg, "n": args.fd_n, "seed": 0, "fd": round(value, 4),
                   "seconds": round(time.time() - t1, 1)})
        print(f"FD teacher steps={steps} cfg={cfg}: {value:.3f} ({fd[-1]['seconds']} s)")
    floor = []
    for r in range(args.noise_floor_repeats):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + r))[:args.fd_n]
        floor.append(frechet_distance(*feature_stats(images[idx], net), *ref))
    print(f"FD noise floor (random {args.fd_n}-image subsets of the data vs all of it): "
          f"mean {np.mean(floor):.3f}, min {np.min(floor):.3f}, max {np.max(floor):.3f}")
    torch.manual_seed(args.seed)  # build_dit draws its init from the global generator
    random_dit = _randomized(build_dit("tiny").eval(), args.seed)
    random_fd = demo_fd(random_dit, n=args.fd_n, steps=DEMO_STEPS, cfg_scale=DEMO_CFG_SCALE, seed=0, net=net, ref=ref)
    print(f"FD of a randomly initialized tiny DiT (steps={DEMO_STEPS}, cfg={DEMO_CFG_SCALE}): {random_fd:.3f}")

    report = json.loads(record.read_text()) if record.is_file() else {}
    report.update({
        "demo_defaults": {"steps": DEMO_STEPS, "cfg_scale": DEMO_CFG_SCALE, "n": 1000, "seed": 0},
        "fd": fd,
        "fd_noise_floor": {"n": args.fd_n, "repeats": args.noise_floor_repeats,
                           "what": "FD of random n-image subsets of the digits against the whole dataset",
                           "values": [round(v, 4) for v in floor], "mean": round(float(np.mean(floor)), 4)},
        "fd_random_init": {"steps": DEMO_STEPS, "cfg_scale": DEMO_CFG_SCALE, "n": args.fd_n, "fd": round(random_fd, 4),
                           "init": "official DiT init, then every zero-initialized layer re-drawn N(0, 0.02)"},
        "eval_environment": environment(),
    })
    record.write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def _randomized(model, seed):
    """A random DiT that is not the adaLN-Zero identity (which would predict eps = 0 everywhere)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and torch.count_nonzero(p) == 0:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what in ("features", "all"):
        train_features(args)
    if args.what in ("dit", "all"):
        train_dit(args)
    if args.what in ("dit", "all", "eval"):
        evaluate_dit(args)


if __name__ == "__main__":
    main()
