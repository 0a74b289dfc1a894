"""model/ implements LeakyReLU by hand: no built-in leaky ReLU (or its PReLU/RReLU
relatives) anywhere in it, however it is imported or spelled.

The scan reads the code, not the text: it follows import aliases
(``import torch.nn.functional as Fn``, ``from torch.nn import functional``,
``from torch.nn.functional import leaky_relu as lr``), attribute chains
(``torch.ops.aten.leaky_relu.default``, ``torch._C._nn.leaky_relu``) and
``getattr(module, "leaky_relu")``; comments and docstrings that name the
built-ins (as the reference tests do) are not code and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import model

FORBIDDEN = {"leaky_relu", "leaky_relu_", "LeakyReLU", "prelu", "PReLU", "rrelu", "rrelu_", "RReLU"}


def _dotted(node: ast.AST, aliases: Dict[str, str]) -> Optional[str]:
    """``a.b.c`` with its first name resolved through the file's imports."""
    parts: List[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def forbidden_uses(source: str) -> List[str]:
    """Each use of a built-in leaky ReLU from torch in ``source``, as ``line: dotted.name``."""
    tree = ast.parse(source)
    aliases: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:  # import torch.nn.functional as F: F is that module
                    aliases[a.asname] = a.name
                else:  # import torch.nn.functional binds torch
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    hits = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, (ast.Attribute, ast.Name)):
            name = _dotted(node, aliases)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[0], (ast.Name, ast.Attribute))
        ):
            base = _dotted(node.args[0], aliases)
            name = f"{base}.{node.args[1].value}" if base else None
        if name and name.split(".")[0] == "torch" and FORBIDDEN & set(name.split(".")):
            hits.append(f"{node.lineno}: {name}")
    for node in ast.walk(tree):  # importing the built-in itself, whatever it is called after
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            hits += [f"{node.lineno}: {node.module}.{a.name}" for a in node.names if a.name in FORBIDDEN]
    return sorted(set(hits))


def test_no_builtin_leaky_relu_in_model_sources():
    root = Path(model.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) >= 8
    hits = [f"{path.relative_to(root)}:{hit}" for path in sources for hit in forbidden_uses(path.read_text())]
    assert hits == []


MUST_MATCH = {
    "F alias": "import torch.nn.functional as F\ny = F.leaky_relu(x)",
    "Fn alias": "import torch.nn.functional as Fn\ny = Fn.leaky_relu(x, 0.2)",
    "from-import module": "from torch.nn import functional\ny = functional.leaky_relu(x)",
    "from-import function": "from torch.nn.functional import leaky_relu\ny = leaky_relu(x)",
    "from-import renamed": "from torch.nn.functional import leaky_relu as lr\ny = lr(x)",
    "inplace": "import torch\ntorch.nn.functional.leaky_relu_(x)",
    "module": "import torch.nn as nn\nact = nn.LeakyReLU(0.1)",
    "torch.nn module": "import torch\nact = torch.nn.LeakyReLU()",
    "PReLU": "from torch import nn\nact = nn.PReLU()",
    "RReLU": "import torch.nn as nn\nact = nn.RReLU()",
    "prelu": "import torch.nn.functional as F\ny = F.prelu(x, w)",
    "rrelu": "import torch\ny = torch.rrelu(x)",
    "aten op": "import torch\ny = torch.ops.aten.leaky_relu(x, 0.01)",
    "aten overload": "import torch\ny = torch.ops.aten.leaky_relu.default(x, 0.01)",
    "C nn": "import torch\ny = torch._C._nn.leaky_relu(x)",
    "getattr": 'import torch.nn.functional as F\ny = getattr(F, "leaky_relu")(x)',
    "aliased torch": "import torch as T\ny = T.nn.functional.leaky_relu(x)",
}
MUST_NOT_MATCH = {
    "ours": "from .layers import leaky_relu\ny = leaky_relu(x, 0.01)",
    "our module": "from model import layers\ny = layers.leaky_relu(x)",
    "comment": "# unlike F.leaky_relu, this is written by hand\ny = torch.where(x > 0, x, x * s)",
    "docstring": 'def f(x):\n    """Same as torch.nn.functional.leaky_relu, by hand."""\n    return x',
    "string": 'name = "torch.nn.LeakyReLU"',
    "other activation": "import torch.nn.functional as F\ny = F.relu(x)",
    "a local named like it": "def leaky_relu(x, s):\n    return x\ny = leaky_relu(x, 0.1)",
}


@pytest.mark.parametrize("case", list(MUST_MATCH))
def test_scanner_catches(case):
    assert forbidden_uses(MUST_MATCH[case]), case


@pytest.mark.parametrize("case", list(MUST_NOT_MATCH))
def test_scanner_lets_through(case):
    assert forbidden_uses(MUST_NOT_MATCH[case]) == [], case
