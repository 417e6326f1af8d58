"""Without a GPU, Triton kernels run in Triton's interpreter; TRITON_INTERPRET must be set before triton is first
imported (graftc.kernels imports it indirectly), so it is set here, before any test module loads."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker would otherwise run as many intra-op threads as the machine has cores; with
# two workers on two cores, OpenMP's spinning threads then slow small ops down by orders of magnitude.
workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

# Hypothesis profiles. "ci" (the default): derandomized, so every run tries the same examples, >= 200 per
# property unless a test says otherwise. "long" (nightly: pytest tests/test_fuzz.py --hypothesis-profile=long):
# 5,000 fresh random examples per property.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=5000, derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


# The longest tests (real models, subprocess compiles, property suites) go first, so that with two workers
# neither ends the run alone with one of them.
LONGEST_FIRST = ("test_properties.py", "test_real_distill.py", "test_faults.py", "test_distill.py",
                 "test_real_models.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
