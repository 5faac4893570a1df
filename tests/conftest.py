"""Shared test set-up.

Triton kernels are tested on the CPU through Triton's interpreter when no GPU is present;
the variable must be set before any kernel module is imported. GPU tests carry the `gpu`
marker and are skipped here; the GPU is never queried at import of a test module beyond
torch.cuda.is_available(), which does not create a context.
"""
import os
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests (tests/test_properties_*.py): "ci" is the default, a few hundred examples
# per property within the suite's time budget; `pytest --hypothesis-profile=long` runs many more.
# No deadline: the first call of a kernel compiles or warms caches, and this machine is shared.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("PYM4_HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----- Ray and Spark: one start each per session, shared by the M4 engine and dataset tests -----

@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def spark():
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (SparkSession.builder.master("local[2]").appName("pym4-tests")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "200").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
