"""graftc: graft new operators into pretrained transformers.

    result = graftc.compile(model, plan, example_inputs)   # rewrite in place by a plan
    model = graftc.load("out/")                            # rebuild a saved graft
"""
__version__ = "0.1.0"

from graftc.errors import GraftError  # noqa: E402


def __getattr__(name):  # keep `import graftc` light: torch-heavy modules load on first use
    if name in ("compile", "inspect_regions", "GraftResult"):
        from graftc import compiler

        return getattr(compiler, name)
    if name == "load":
        from graftc.artifact import load

        return load
    if name == "load_model":
        from graftc.spec import load_model

        return load_model
    raise AttributeError(name)


__all__ = ["GraftError", "compile", "inspect_regions", "load", "load_model", "__version__"]
