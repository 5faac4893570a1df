"""README.md's usage examples run as written.

Every ```python block of README.md is executed, in order, in one namespace (a later block may
use an earlier one's names), exactly as a user would paste it: no line is skipped or edited.
The README defines its own small stand-in data at the top of its example (features, scores,
0/1 group and label matrices, rank 0 of a world of 1), so nothing is injected here; warnings
are errors (pytest's configuration), so an example that only works with a warning fails too.
"""
import math
import os
import re

import numpy as np
import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks(text):
    """The contents of the ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S)


def test_python_blocks_are_found():
    text = "intro\n```python\na = 1\n```\n```bash\nmake\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = a + 1\n"]


@pytest.fixture(scope="module")
def readme_namespace():
    with open(README, encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    assert blocks, "README.md has no ```python block"
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        assert block.strip(), f"README.md python block {i} is empty"
        exec(compile(block, f"README.md:python block {i}", "exec"), namespace)
    return namespace


def test_readme_examples_run_and_give_what_they_say(readme_namespace):
    ns = readme_namespace
    # Sinkhorn: "rows sum to 1"; the features form gives the same codes as the scores form.
    q, scores = ns["q"], ns["scores"]
    assert q.shape == scores.shape
    torch.testing.assert_close(q.sum(1), torch.ones(q.shape[0]), rtol=0, atol=1e-4)
    plan = ns["plan"]
    np.testing.assert_allclose(plan.sum(1), ns["a"], rtol=1e-6)
    # Losses: finite scalars; retrieval: k indices per query.
    assert ns["loss"].shape == () and math.isfinite(float(ns["loss"]))
    assert ns["indices"].shape == (ns["text_features"].shape[0], 10)
    # M4: the example's own claims (status printed, budget met, a sample drawn from q).
    result = ns["result"]
    assert result.status == "optimal", result.message
    assert abs(float(np.mean(result.q)) - 0.5) < 1e-3
    assert len(ns["keep"]) == len(result.q)
