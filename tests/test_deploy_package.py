"""tfqreg.deploy as a package: modules import downward only, nobody reaches into another
module's private helpers, and the earlier module names re-export the same objects."""

import ast
import os
import subprocess
import sys

import pytest

import tfqreg
from tfqreg import cli, deploy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "tfqreg", "deploy")

# Each module may import deploy modules of a lower layer only. The low-bit writer works on
# flatbuffers (float .tflite in, packed INT4/INT2 .tflite out) beside the shared samples, below
# the converter that calls it.
LAYERS = {"tflite_file": 0, "loading": 0, "runtime": 1, "report": 2, "arguments": 3,
          "samples": 4, "lowbit": 4, "convert": 5, "edgetpu": 5, "micro": 6, "cli": 7}


def _imports(path):
    """(module, names) of every import in a file, function-level ones included."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _modules():
    return sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py")


def _deploy_deps(name):
    deps = set()
    for module, names in _imports(os.path.join(PKG, f"{name}.py")):
        if module == "tfqreg.deploy":
            deps.update(names)  # from tfqreg.deploy import samples
        elif module.startswith("tfqreg.deploy."):
            deps.add(module.split(".")[2])
    return deps


def test_modules_import_downward_only():
    for name in _modules():
        deps = _deploy_deps(name)
        assert name not in deps
        if name in LAYERS:
            for dep in deps:
                assert dep in LAYERS and LAYERS[dep] < LAYERS[name], \
                    f"tfqreg.deploy.{name} imports tfqreg.deploy.{dep}"
    # whatever the layers, no cycle
    graph = {n: _deploy_deps(n) for n in _modules()}
    seen, done = set(), set()

    def visit(n, path):
        assert n not in seen or n in done, f"import cycle: {' -> '.join(path + [n])}"
        if n in done:
            return
        seen.add(n)
        for d in graph.get(n, ()):
            visit(d, path + [n])
        done.add(n)

    for n in graph:
        visit(n, [])


def test_the_reader_needs_no_report_and_edgetpu_only_the_reader():
    assert _deploy_deps("tflite_file") == set()
    assert _deploy_deps("edgetpu") == {"tflite_file"}


def test_every_deploy_module_has_a_layer():
    assert set(_modules()) == set(LAYERS)


def test_the_low_bit_writer_needs_only_the_runtime():
    # flatbuffer in, flatbuffer out: no Keras model, no report, no converter
    assert _deploy_deps("lowbit") == {"runtime"}


@pytest.mark.parametrize("path", [os.path.join(PKG, f) for f in sorted(os.listdir(PKG))
                                  if f.endswith(".py")]
                         + [os.path.join(REPO, "tfqreg", f"{m}.py")
                            for m in ("export", "micro", "edgetpu", "main_job", "summary")])
def test_no_private_names_are_imported_across_modules(path):
    for module, names in _imports(path):
        if module.startswith("tfqreg"):
            # a package-internal module (``from tfqreg import _checks``) is what
            # ``from tfqreg._checks import ...`` reaches too; a private name inside a module is not
            private = [n for n in names if n.startswith("_") and not os.path.isfile(
                os.path.join(REPO, *module.split("."), f"{n}.py"))]
            assert not private, f"{os.path.relpath(path, REPO)} imports {private} from {module}"


@pytest.mark.parametrize("old", ["export", "micro", "edgetpu"])
def test_earlier_modules_re_export_the_same_objects(old):
    mod = getattr(tfqreg, old)
    assert mod.__all__ and len(set(mod.__all__)) == len(mod.__all__)
    for name in mod.__all__:
        obj = getattr(mod, name)
        owner = getattr(obj, "__module__", None)
        if owner and owner.startswith("tfqreg.deploy"):
            assert getattr(sys.modules[owner], name) is obj
        if name in deploy.__all__:
            assert getattr(deploy, name) is obj
    # nothing but imports, a docstring and __all__: no code of their own
    tree = ast.parse(open(mod.__file__).read())
    for node in tree.body:
        assert isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)), \
            f"tfqreg/{old}.py defines {type(node).__name__}"
        if isinstance(node, ast.Assign):
            assert [t.id for t in node.targets] == ["__all__"]


def test_deploy_exports_what_it_lists():
    for name in deploy.__all__:
        assert hasattr(deploy, name), name
    for name in ("to_tflite", "to_lce", "to_micro", "check_edgetpu", "read_tflite", "Runner",
                 "ExportResult", "ExportReport", "ParityReport", "ConversionError",
                 "ParityError", "load_model", "TfliteGraph", "quantize_tflite",
                 "weight_report", "WeightReport", "WeightTensor", "SUPPORTED_BITS"):
        assert name in deploy.__all__


def test_deploy_names_are_the_defining_modules_objects():
    from tfqreg.deploy import lowbit

    for name in ("SUPPORTED_BITS", "WEIGHT_OPS", "WeightPlan", "WeightTensor", "WeightReport",
                 "quantize_tflite", "weight_report", "unpack_integers"):
        assert name in deploy.__all__ and getattr(deploy, name) is getattr(lowbit, name), name
    assert deploy.IO_DTYPES is deploy.convert.IO_DTYPES  # lowbit has its own (no uint8)
    assert len(set(deploy.__all__)) == len(deploy.__all__)


def test_cli_export_is_the_deploy_cli():
    assert ("export", "tfqreg.deploy.cli") in [c[:2] for c in cli.COMMANDS]


def test_plain_import_reaches_the_deployment_modules():
    code = ("import sys, tfqreg\n"
            "assert 'tfqreg.deploy' not in sys.modules\n"
            "assert tfqreg.export.to_tflite is tfqreg.deploy.to_tflite\n"
            "assert tfqreg.micro.to_micro is tfqreg.deploy.micro.to_micro\n"
            "assert tfqreg.edgetpu.check_edgetpu is tfqreg.deploy.edgetpu.check_edgetpu\n"
            "assert {'deploy', 'export', 'micro', 'edgetpu'} <= set(dir(tfqreg))\n"
            "try:\n    tfqreg.no_such_module\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
