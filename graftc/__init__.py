"""graftc: graft new operators into pretrained transformers.

    result = graftc.compile(model, plan, example_inputs)   # rewrite in place by a plan
    model = graftc.load("out/")                            # rebuild a saved graft
"""
from graftc.errors import GraftError
from graftc.version import __version__

# `import graftc` stays light: the torch-heavy modules load on first use (the imports inside the functions below).


def compile(model, plan, example_inputs=(), progress=None, locality=None, sensitivity=None):
    """Rewrite `model` in place by `plan` (a Plan, a dict, or a path to YAML); returns a graftc.compiler.GraftResult.
    `example_inputs` is a tuple of positional args or a dict of keyword args, used to trace the model and check
    every rewrite.

    `locality(model, regions) -> {"order": [...], ...}` ranks attention layers for the local-first /
    nonlocal-first strategies (the CLI measures on the model's own data, cached); by default they are ranked on
    the example inputs. `sensitivity(model, regions, replace) -> {"order": [...], ...}` ranks them for
    least-sensitive-first (``graftc.rankings.sensitivity_on_data``; it needs the model's data, so there is no
    default). Inside graftc the verb is `graftc.compiler.graft`, which takes the rankings as data."""
    from graftc import compiler, rankings, trace

    given = {"locality": rankings.Ranking(lambda m, regions, _replace: locality(m, regions)) if locality else
             rankings.on_examples(*trace.split_inputs(example_inputs))}
    if sensitivity is not None:
        given["sensitivity"] = sensitivity if isinstance(sensitivity, rankings.Ranking) else \
            rankings.Ranking(sensitivity, per_step=True)
    return compiler.graft(model, plan, example_inputs, given, progress)


def __getattr__(name):
    if name in ("inspect_regions", "GraftResult", "load", "load_model"):
        from graftc import artifact, compiler, match, spec

        return {"inspect_regions": match.inspect_regions, "GraftResult": compiler.GraftResult, "load": artifact.load,
                "load_model": spec.load_model}[name]
    raise AttributeError(name)


__all__ = ["GraftError", "compile", "inspect_regions", "load", "load_model", "__version__"]
