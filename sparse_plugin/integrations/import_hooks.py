"""Run a function right after a module is imported, without importing it ourselves.

`import sparse_plugin` must make `optim="spiel_sm3"` valid, but the enum and the handler table it extends live in
transformers modules whose import costs seconds (they pull in peft and bitsandbytes). So the names are added
when the user's own code imports those modules, or at once if it already has. Standard library only: this module is
imported by `import sparse_plugin`, hence by the `sparse-merge` console script too (and `importlib.abc`, costly to
import, is left out: the import system only needs the two methods each class defines).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

Callback = Callable[[ModuleType], None]


class _AfterImport:
    """A `sys.meta_path` entry that finds nothing itself: for a watched name it asks the other finders for the
    module's spec and wraps the loader so that the callbacks run once the module's code has run."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callback]] = {}
        self._searching: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending or fullname in self._searching:
            return None
        self._searching.add(fullname)  # importlib.util.find_spec below walks sys.meta_path again, this entry included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.discard(fullname)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _ThenCall(spec.loader, self._fire)
        return spec

    def _fire(self, module: ModuleType) -> None:
        for callback in self.pending.pop(module.__name__, ()):
            callback(module)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


class _ThenCall:
    """The module's own loader, then `after(module)`; the module keeps its real loader in its attributes."""

    def __init__(self, loader, after: Callback) -> None:
        self._loader, self._after = loader, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._after(module)


_finder = _AfterImport()


def when_imported(name: str, callback: Callback) -> None:
    """Call `callback(module)` once module `name` is imported: now if it already is, else right after its code runs.

    The callback runs inside the importer's `import` statement, so it must not import modules that may be half
    initialised at that point (the package that triggered the import, say); it should only act on `module`.

    Args:
        name (`str`): the module's full dotted name, e.g. `"transformers.training_args"`.
        callback (`Callable[[ModuleType], None]`): called once with the imported module.
    """
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    _finder.pending.setdefault(name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
