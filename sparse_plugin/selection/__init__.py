"""Selection methods: which positions each sparse layer trains, decided from gradient information."""

from .sift import SiftSelector
from .smt import SmtSelector
from .spiel import SpielSelector

SELECTORS = {"spiel": SpielSelector, "smt": SmtSelector, "sift": SiftSelector}


def make_selector(model, config, optimizer, total_steps=None):
    """The schedule of `config.method` for `optimizer`."""
    return SELECTORS[config.method](model, config, optimizer, total_steps)
