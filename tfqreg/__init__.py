"""tfqreg: train Keras models that survive quantization, and ship them to edge hardware.

Importing tfqreg makes Keras 2 (``tf_keras``) the Keras of ``tf.keras`` when nothing has touched
``tf.keras`` yet (see :mod:`tfqreg._keras`). It works whatever was imported first: when
``tf.keras`` was already resolved to Keras 3, tfqreg's Keras 2 code still uses ``tf_keras``, its
Keras 3 support uses ``keras``, and only the larq-based parts (:mod:`tfqreg.quantizers`, the
LCE export, the BNN builder) are unavailable: they raise a clear ``ImportError`` when used
(``tfqreg.quantizers`` is then not imported by ``import tfqreg``). It imports its modules, and
so registers every tfqreg object and string alias with both Kerases, at once.

One exception: the ``tfqreg`` command (:mod:`tfqreg.cli`) imports the package before it parses
its arguments, and ``--help`` or a bad argument should not wait ~5 s for TensorFlow. In that
process (:func:`tfqreg._command.is_command`) the imports below run when the command calls
:func:`load` after parsing, or on the first attribute of the package that needs them.
"""

from tfqreg import _command

__version__ = "0.1.0"
__all__ = ["datasets", "foothill", "grid", "losses", "ptq", "quantization", "quantizers",
           "regularizers", "training", "compression", "summary", "summarize", "deploy",
           "export", "edgetpu", "micro", "load"]

# Imported eagerly by ``import tfqreg`` (in the order that matters: _keras sets
# TF_USE_LEGACY_KERAS first; compression after training, which its pipeline uses).
_EAGER_MODULES = ("_keras", "datasets", "foothill", "grid", "losses", "ptq", "quantization",
                  "quantizers", "regularizers", "training", "compression", "summary")
# Deployment is imported on first use (``tfqreg.deploy.to_tflite(...)``, ``tfqreg.export``):
# ~35 ms today, and it keeps ``import tfqreg`` free of whatever the deploy modules import.
_LAZY_MODULES = ("deploy", "export", "edgetpu", "micro")
# Modules that import larq at import time: not imported by ``import tfqreg`` when larq cannot
# work in this process (``tf.keras`` was Keras 3 before tfqreg); using one raises the
# ImportError of :func:`tfqreg._keras.require_larq`.
_LARQ_MODULES = ("quantizers",)
_loaded = False


def _larq_usable() -> bool:
    import importlib

    # import_module, not ``from tfqreg import _keras``: before load() that form asks this
    # package's __getattr__ for "_keras", which calls load(), which calls this (recursion)
    return not importlib.import_module("tfqreg._keras").TF_KERAS_IS_KERAS3


def load() -> None:
    """Import tfqreg's modules (registering its Keras objects and aliases); a no-op once done.
    ``import tfqreg`` calls it, except in the ``tfqreg`` command before its arguments are
    parsed."""
    global _loaded, summary, summarize
    if _loaded:
        return
    import importlib

    larq_ok = _larq_usable()
    for name in _EAGER_MODULES:
        if name in _LARQ_MODULES and not larq_ok:
            continue
        importlib.import_module(f"tfqreg.{name}")
    from tfqreg.summary import summarize, summary  # noqa: F811  (tfqreg.summary(model) prints)

    _loaded = True


if _command.is_command():
    # TensorFlow's C++ INFO/WARNING lines would bury the command's output (tfqreg._keras)
    import os as _os

    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
else:
    load()


def __getattr__(name: str):
    if name in _LARQ_MODULES and not _larq_usable():
        from tfqreg._keras import require_larq

        require_larq(f"tfqreg.{name}")  # raises the ImportError that says what to do
    if name in _LAZY_MODULES:
        import importlib

        load()
        return importlib.import_module(f"tfqreg.{name}")  # also sets the attribute
    if not _loaded and (name in _EAGER_MODULES or name in ("summary", "summarize")):
        load()
        return globals()[name]
    raise AttributeError(f"module 'tfqreg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_EAGER_MODULES) | {"summarize"})
