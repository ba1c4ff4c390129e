"""Built-in example tasks. All run offline on a CPU in seconds: their data ships with bsselect
(UCI/scikit-learn digits), with Python (the ``pydoc_data`` help text) or is generated."""

from __future__ import annotations

from typing import Callable

from ..task import Task
from .digits import digits_cnn, digits_mlp
from .linreg import linreg
from .lm import tiny_lm

EXAMPLES: dict[str, Callable[[], Task]] = {
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "tiny-lm": tiny_lm,
    "linreg": linreg,
}
DESCRIPTIONS: dict[str, str] = {
    "digits-mlp": "MLP on the 8x8 UCI handwritten digits (1,797 images, shipped), SGD",
    "digits-cnn": "small CNN on the same digits, SGD",
    "tiny-lm": "character-level GPT (2 layers) on Python's bundled help text, AdamW",
    "linreg": "synthetic linear regression whose gradient noise scale is known in closed form",
}
DEFAULT = "digits-mlp"

__all__ = ["EXAMPLES", "DESCRIPTIONS", "DEFAULT", "digits_mlp", "digits_cnn", "tiny_lm", "linreg"]
