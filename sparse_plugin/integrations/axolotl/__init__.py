"""Axolotl integration: `plugins: [sparse_plugin.SparsePlugin]` with `sparse_*` keys (see axolotl_configs/).

Importing this package imports axolotl; `import sparse_plugin` does not (it resolves `SparsePlugin` lazily).
"""

from .args import SparseArgs
from .plugin import SparsePlugin

__all__ = ["SparseArgs", "SparsePlugin"]
