"""graftc.models.dit: checkpoint-compatible structure, forward, export and checkpoint loading."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from graftc.errors import GraftError
from graftc.models.dit import (
    DIT_CONFIGS,
    DiT,
    build_dit,
    example_inputs,
    load_dit_checkpoint,
    timestep_embedding,
)

# Every key and shape of the official DiT-XL/2 and DiT-S/2 checkpoints with their parameter counts (a copy of
# ../shared/dit_checkpoint_keys.json kept in the repository, so these tests run on any checkout)
KEYS_JSON = Path(__file__).resolve().parent / "data" / "dit_checkpoint_keys.json"


@pytest.fixture(scope="module")
def reference():
    return json.loads(KEYS_JSON.read_text())


def randomized(model: DiT, seed: int) -> DiT:
    """Fresh DiTs predict exactly zero (adaLN-Zero), so give every weight a random value to make outputs informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return randomized(build_dit("tiny"), seed=1)


# ----------------------------------------------------------------- structure


@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-S/2"])
def test_state_dict_matches_official_checkpoint(reference, name):
    with torch.device("meta"):
        model = build_dit(name)
    expected = reference[name]["state_dict"]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same keys, same order
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == reference[name]["params"]


def test_configs_and_defaults():
    assert set(DIT_CONFIGS) == {f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)} | {"tiny"}
    assert tuple(DIT_CONFIGS["DiT-XL/2"]) == (28, 1152, 2, 16)
    assert tuple(DIT_CONFIGS["DiT-L/4"]) == (24, 1024, 4, 16)
    assert tuple(DIT_CONFIGS["DiT-B/8"]) == (12, 768, 8, 12)
    assert tuple(DIT_CONFIGS["DiT-S/2"]) == (12, 384, 2, 6)
    assert tuple(DIT_CONFIGS["tiny"]) == (6, 128, 2, 4)

    with torch.device("meta"):
        tiny = build_dit("tiny")
        tiny_rgb = build_dit("tiny", in_channels=3, learn_sigma=True)
        b4 = build_dit("DiT-B/4", input_size=64, depth=2)
    assert (tiny.input_size, tiny.in_channels, tiny.num_classes, tiny.out_channels) == (8, 1, 10, 1)
    assert (tiny_rgb.input_size, tiny_rgb.in_channels, tiny_rgb.out_channels) == (8, 3, 6)
    assert tiny.y_embedder.embedding_table.weight.shape == (11, 128)  # + CFG null class
    assert (b4.depth, len(b4.blocks), b4.pos_embed.shape) == (2, 2, (1, 256, 768))


def test_unknown_name_lists_allowed():
    with pytest.raises(GraftError) as e:
        build_dit("DiT-M/2")
    msg = str(e.value)
    assert "DiT-M/2" in msg and "DiT-XL/2" in msg and "tiny" in msg and "\n" not in msg
    with pytest.raises(GraftError, match="depth"):
        build_dit("tiny", depthh=3)


def official_layout_pos_embed(dim: int, grid: int) -> np.ndarray:
    """Independent numpy reference of the table stored in the official checkpoints."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # xy: g[0] = column
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


def test_pos_embed_is_fixed_sincos():
    model = build_dit("DiT-S/2", depth=1)
    ref = torch.from_numpy(official_layout_pos_embed(384, 16)).float().unsqueeze(0)
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed.detach(), ref, rtol=0, atol=1e-7)
    # Spot check of the layout: token 1 is (row 0, col 1); the row half of the channels is still position 0.
    assert model.pos_embed[0, 1, 0].item() == pytest.approx(math.sin(1.0))
    assert model.pos_embed[0, 1, 192].item() == 0.0


def test_timestep_features_cos_then_sin():
    model = build_dit("tiny")
    f = timestep_embedding(torch.tensor([0, 3]))
    assert f.shape == (2, 256)
    assert torch.equal(f[0, :128], torch.ones(128)) and torch.equal(f[0, 128:], torch.zeros(128))
    assert f[1, 0].item() == pytest.approx(math.cos(3.0), abs=1e-6)  # frequency 1 first
    assert model.t_embedder.mlp[0].in_features == 256


def test_fresh_model_init_is_adaln_zero():
    torch.manual_seed(0)
    model = build_dit("tiny").eval()
    x, t, y = example_inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # zero-initialised final layer
    assert all(torch.count_nonzero(b.adaLN_modulation[1].weight) == 0 for b in model.blocks)
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.blocks[0].attn.qkv.weight.abs().max().item() <= math.sqrt(6 / (128 + 384)) + 1e-6


# ------------------------------------------------------------------- forward


def test_forward_shapes_dit_s2():
    torch.manual_seed(0)
    model = randomized(build_dit("DiT-S/2"), seed=0)
    x, t, y = example_inputs(model, batch_size=2)
    assert (x.shape, t.dtype, y.dtype) == ((2, 4, 32, 32), torch.int64, torch.int64)
    with torch.no_grad():
        out = model(x, t, y)
        out_float_t = model(x, t.float(), y)
    assert out.shape == (2, 8, 32, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out, out_float_t)


def test_forward_tiny_and_example_inputs(tiny):
    x, t, y = example_inputs(tiny, batch_size=3, seed=5)
    x2, t2, y2 = example_inputs(tiny, batch_size=3, seed=5)
    assert torch.equal(x, x2) and torch.equal(t, t2) and torch.equal(y, y2)
    assert x.shape == (3, 1, 8, 8) and int(y.max()) < 10
    with torch.no_grad():
        out = tiny(x, t, y)
        # Batch items are independent, and the label matters.
        torch.testing.assert_close(tiny(x[:1], t[:1], y[:1]), out[:1])
        assert not torch.allclose(tiny(x, t, (y + 1) % 10), out)
        dropped = tiny.y_embedder(y, force_drop_ids=torch.ones_like(y))
    assert out.shape == (3, 1, 8, 8)
    assert torch.equal(dropped, tiny.y_embedder.embedding_table.weight[10].expand(3, -1))


def test_torch_export_non_strict(tiny):
    inputs = example_inputs(tiny)
    ep = torch.export.export(tiny, inputs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*inputs), tiny(*inputs))


# --------------------------------------------------------------- checkpoints


def outputs(model):
    with torch.no_grad():
        return model(*example_inputs(model, seed=3))


def test_load_plain_pt_and_safetensors(tiny, tmp_path):
    ref = outputs(tiny)
    torch.save(tiny.state_dict(), tmp_path / "plain.pt")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("plain.pt", "w.safetensors"):
        fresh = build_dit("tiny").eval()
        load_dit_checkpoint(fresh, tmp_path / name)
        assert torch.equal(outputs(fresh), ref), name


def test_load_training_checkpoint_prefers_ema(tiny, tmp_path):
    other = randomized(build_dit("tiny"), seed=7)
    torch.save({"model": other.state_dict(), "ema": tiny.state_dict(), "opt": {}, "args": 3}, tmp_path / "ckpt.pth")
    torch.save({"model": other.state_dict()}, tmp_path / "model_only.bin")

    fresh = build_dit("tiny").eval()
    load_dit_checkpoint(fresh, str(tmp_path / "ckpt.pth"))
    assert torch.equal(outputs(fresh), outputs(tiny))
    load_dit_checkpoint(fresh, tmp_path / "model_only.bin")
    assert torch.equal(outputs(fresh), outputs(other))


def test_load_into_meta_model(tiny, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "plain.pt")
    with torch.device("meta"):
        model = build_dit("tiny")
    load_dit_checkpoint(model, tmp_path / "plain.pt")
    assert torch.equal(outputs(model.eval()), outputs(tiny))


def bad_checkpoints(tiny, d: Path):
    sd = tiny.state_dict()
    good = d / "good.pt"
    torch.save(sd, good)
    blob = good.read_bytes()
    (d / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (d / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    wide = build_dit("tiny", num_classes=12).state_dict()
    torch.save(wide, d / "wrong_shape.pt")
    torch.save({**sd, "extra.weight": torch.zeros(2)}, d / "extra_key.pt")
    torch.save({k: v for k, v in sd.items() if not k.startswith("final_layer")}, d / "missing_key.pt")

    class Evil:  # must never be unpickled
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, d / "pickle.pt")
    return {
        "absent.pt": "no such file",
        "truncated.pt": "cannot read",
        "garbage.safetensors": "cannot read",
        "wrong_shape.pt": "y_embedder.embedding_table.weight expected [11, 128] found [13, 128]",
        "extra_key.pt": "unexpected keys extra.weight",
        "missing_key.pt": "missing keys final_layer.linear.weight",
        "pickle.pt": "cannot read",
    }


def test_bad_checkpoints_raise_one_line_graft_error(tiny, tmp_path):
    for name, fragment in bad_checkpoints(tiny, tmp_path).items():
        model = build_dit("tiny")
        with pytest.raises(GraftError) as e:
            load_dit_checkpoint(model, tmp_path / name)
        msg = str(e.value)
        assert name in msg and fragment in msg and "\n" not in msg, msg
