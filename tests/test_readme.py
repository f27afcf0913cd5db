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
