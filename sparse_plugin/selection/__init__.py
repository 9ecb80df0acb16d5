"""Selection methods: which positions each sparse layer trains, decided from gradient information.

`SELECTORS` maps `SparseConfig.method` to its selector class; what a selector and its optimizer may call on each
other is `protocol` (docs/extending.md: adding a method)."""

from .sift import SiftSelector
from .smt import SmtSelector
from .spiel import SpielSelector

SELECTORS = {"spiel": SpielSelector, "smt": SmtSelector, "sift": SiftSelector}


def make_selector(model, config, optimizer, total_steps=None):
    """The schedule of `config.method` for `optimizer`, its `protocol.SelectionHost`."""
    return SELECTORS[config.method](model, config, optimizer, total_steps)
