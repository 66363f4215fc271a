"""covidct-batch engine: decode, contract, prediction and the Ray screening pipeline.

The ground floor of the project: ``train``, ``export`` and ``benchmarks`` import from it;
it imports none of them and never TensorFlow.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("covidct-batch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
