"""The README's results block is what benchmarks/report.py makes of the committed results."""
import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def test_readme_results_block_matches_the_results_files():
    # the README's tables are copied from benchmarks/results/*.json by benchmarks/report.py;
    # a results file committed without rerunning the report (or a hand edit) fails here
    spec = importlib.util.spec_from_file_location("bench_report",
                                                  os.path.join(REPO, "benchmarks", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    block = readme[readme.index(report.START):readme.index(report.END) + len(report.END)]
    assert block == report.render()
    with open(os.path.join(RESULTS, "robustness.json")) as f:
        robustness = json.load(f)
    assert robustness["table"].strip() in block


def test_report_add_to_commands_follow_the_stored_runs():
    # rows added on a subset of the architectures get their own command, with that --archs
    spec = importlib.util.spec_from_file_location("bench_report",
                                                  os.path.join(REPO, "benchmarks", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    d = {"runs": {"a": {"plain": [], "x": [], "y": []}, "b": {"plain": [], "x": []}},
         "added_rows": ["x", "y"]}
    base = "python benchmarks/defaults_transfer.py --seeds 5 --out f.json"
    assert report._added_commands(d, base, "f.json") == [
        "python benchmarks/defaults_transfer.py --seeds 5 --rows x --add-to f.json",
        "python benchmarks/defaults_transfer.py --archs a --seeds 5 --rows y --add-to f.json"]
    base = "python benchmarks/defaults_transfer.py --archs a b --seeds 5 --out f.json"
    assert report._added_commands(d, base, "f.json")[0] == (
        "python benchmarks/defaults_transfer.py --archs a b --seeds 5 --rows x --add-to f.json")
