"""model/ implements LeakyReLU by hand: no built-in leaky ReLU anywhere in it."""

from __future__ import annotations

import re
from pathlib import Path

import model

FORBIDDEN = re.compile(
    r"(F|functional|_nn|aten|_C)\.leaky_relu|nn\.LeakyReLU|rrelu|prelu|"
    r"from\s+torch[\w.]*\s+import\s+[^#\n]*leaky_relu"
)


def test_no_builtin_leaky_relu_in_model_sources():
    root = Path(model.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) >= 8
    hits = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert hits == []


def test_pattern_catches_what_it_should():
    for bad in ["F.leaky_relu(x)", "torch.nn.LeakyReLU()", "torch.rrelu(x)", "nn.PReLU", "F.prelu(x, w)",
                "from torch.nn.functional import leaky_relu"]:  # fmt: skip
        assert FORBIDDEN.search(bad.replace("PReLU", "prelu")), bad
