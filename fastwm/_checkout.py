"""A source checkout imported without installing (``python -m ...`` from the repository root, as a GPU machine with
no registry runs it): ``fastwm.kernels`` and ``fastwm.benchmarks`` are the repository's kernels/ and benchmarks/
folders, where setuptools' package-dir maps them when installed. An installed copy (wheel or editable) is left as it
is."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(_here)
_installed = os.path.isdir(os.path.join(_here, "kernels"))
_checkout = all(os.path.isfile(os.path.join(_root, *p))
                for p in (("pyproject.toml",), ("kernels", "__init__.py"), ("benchmarks", "__init__.py")))
_package = sys.modules[__name__.rpartition(".")[0]]
if _checkout and not _installed and _root not in _package.__path__:
    _package.__path__.append(_root)
