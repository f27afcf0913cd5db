"""Collect the tables of the full benchmark runs (benchmarks/results/*.json) into the README.

    python benchmarks/report.py           # rewrite the block between the README's markers
    python benchmarks/report.py --print   # only print it

Each benchmark script stores its printed table under "table" in its JSON, with the machine it
ran on and when; this script copies them verbatim, so the README shows exactly what was measured.
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"

SECTIONS = (
    ("robustness.json", "Bit-width robustness (benchmark 1)", "python benchmarks/robustness.py"),
    ("robustness_gradient_l1.json", "Gradient-ℓ1 at larger λ, switched on after epoch 1",
     "python benchmarks/robustness.py --methods gradient_l1_1e-3_late gradient_l1_1e-2_late "
     "gradient_l1_3e-2_late --seeds 2 --tag gradient_l1"),
    ("bnn.json", "Binary networks (benchmark 2)", "python benchmarks/bnn.py"),
    ("step_time.json", "Training-step overhead (benchmark 3)", "python benchmarks/step_time.py"),
    ("deployment.json", "Deployment (benchmark 4)", "python benchmarks/deployment.py"),
    ("compression.json", "Compression pipeline vs TFMOT", "python benchmarks/compression.py"),
    ("robustness_gl1_step.json", "Gradient-ℓ1: λ on the step scale, three forms (small_cnn)",
     "python benchmarks/robustness.py --seeds 2 --methods plain gl1_step_1e-3_fd "
     "gl1_step_3e-3_fd gl1_step_1e-2_fd gl1_step_3e-3_exact gl1_step_3e-3_lazy4 --tag gl1_step"),
    ("robustness_ds_cnn_gl1_step.json", "Gradient-ℓ1: λ on the step scale (ds_cnn, BatchNorm)",
     "python benchmarks/robustness.py --model ds_cnn --epochs 3 --seeds 2 --methods plain "
     "gl1_step_1e-3_fd gl1_step_3e-3_fd gl1_step_1e-2_fd --tag gl1_step"),
    ("robustness_ds_cnn.json", "Bit-width robustness with BatchNorm (ds_cnn)",
     "python benchmarks/robustness.py --model ds_cnn"),
    ("batchnorm_fold.json", "BatchNorm folding: tfqreg.ptq vs an independent fold",
     "python benchmarks/batchnorm_fold.py"),
    ("defaults_transfer.json", "Defaults that transfer: every regularizer at its default",
     "python benchmarks/defaults_transfer.py"),
    ("defaults_transfer_bn_free_5seeds.json",
     "Defaults that transfer: the two BatchNorm-free models, 5 seeds",
     "python benchmarks/defaults_transfer.py --archs small_cnn mlp --seeds 5 "
     "--out defaults_transfer_bn_free_5seeds.json"),
    ("defaults_transfer_bn_3seeds.json",
     "Defaults that transfer: the two BatchNorm models, 3 seeds, one machine",
     "python benchmarks/defaults_transfer.py --archs ds_cnn resnet_small --seeds 3 --rows plain "
     "gradient_l1 gradient_l1:method=finite_difference gradient_l1:method=finite_difference,every=4 "
     "msqe partial_l2:l=1 msqe:l=100 msqe:l=10000 --out defaults_transfer_bn_3seeds.json"),
    ("defaults_transfer_bn_pruning.json",
     "Defaults that transfer: partial L2 on the two BatchNorm models, 3 seeds, statistics "
     "re-estimated after pruning",
     "python benchmarks/defaults_transfer.py --archs ds_cnn resnet_small --seeds 3 --rows plain "
     "partial_l2:l=1 partial_l2 partial_l2:l=100 --out defaults_transfer_bn_pruning.json"),
    ("device_match.json", "Simulation vs the file in LiteRT, image by image",
     "python benchmarks/device_match.py"),
    ("bnn_convergence.json", "Binary networks trained to convergence (benchmark 2b)",
     "python benchmarks/bnn_convergence.py --train-size 15000 --tune-epochs 2 --epochs 20 "
     "--seeds 5 --resume"),
)

#: sections left out of the README (instead of "Not run yet") until their full run exists
OPTIONAL = {"robustness_ds_cnn.json", "robustness_gl1_step.json",
            "robustness_ds_cnn_gl1_step.json", "batchnorm_fold.json", "defaults_transfer.json",
            "defaults_transfer_bn_free_5seeds.json", "defaults_transfer_bn_3seeds.json",
            "defaults_transfer_bn_pruning.json",
            "bnn_convergence.json", "device_match.json"}


def _describe(d: dict) -> str:
    m = d.get("machine", {})
    if not isinstance(m, dict):
        m = {"description": str(m)}
    bits = [m.get("description") or f"{m.get('cpu_count', d.get('cpu_count', '?'))} CPU cores",
            f"TF {m.get('tensorflow', d.get('tensorflow', '?'))}"]
    if d.get("cpu"):
        bits.insert(1, f"CPU {d['cpu']}")
    settings = d.get("settings") if isinstance(d.get("settings"), dict) else {}
    for key in ("seeds_done", "seeds", "epochs", "repeats", "process_runs"):
        if key in d or key in settings:
            bits.append(f"{key.replace('_', ' ')} {d.get(key, settings.get(key))}")
    if d.get("wall_seconds"):
        bits.append(f"wall time {d['wall_seconds'] / 60:.0f} min")
    if "loadavg_1min" in d:
        bits.append(f"load average {d['loadavg_1min']:.1f} while measuring")
    if d.get("written"):
        bits.append(f"written {d['written']}")
    return ", ".join(bits)


def _step_time_table(d: dict) -> str:
    lines = [f"{'configuration':<18}{'median ms':>10}{'ratio':>8}{'target':>8}"]
    for name, r in d["rows"].items():
        target = "" if r.get("target") is None else f"≤{r['target']:.2f}"
        lines.append(f"{name:<18}{r['median_ms']:>10.1f}{r['ratio']:>7.2f}×{target:>8}")
    return "\n".join(lines)


def _added_commands(d: dict, command: str, fname: str) -> list:
    """The ``--add-to`` commands that added ``d["added_rows"]``: one per set of architectures
    the rows were run on (read off the stored runs), so each can be rerun as printed."""
    tokens, base, skip = command.split(), [], False
    for i, t in enumerate(tokens):  # the base command without its --out and --archs
        if t in ("--out", "--archs"):
            skip = True
            continue
        if skip and not t.startswith("--"):
            continue
        skip = False
        base.append(t)
    archs_in_file = list(d["runs"])
    groups: dict = {}
    for row in d["added_rows"]:
        archs = tuple(a for a in archs_in_file if row in d["runs"][a])
        groups.setdefault(archs, []).append(row)
    base_has_archs = "--archs" in tokens
    out = []
    for archs, rows in groups.items():
        archs_arg = (f" --archs {' '.join(archs)}"
                     if base_has_archs or list(archs) != archs_in_file else "")
        out.append(f"{base[0]} {base[1]}{archs_arg}{''.join(' ' + t for t in base[2:])} "
                   f"--rows {' '.join(rows)} --add-to {fname}")
    return out


def render() -> str:
    out = [START, ""]
    for fname, title, command in SECTIONS:
        path = os.path.join(RESULTS, fname)
        if not os.path.exists(path):
            if fname not in OPTIONAL:
                out += [f"### {title}", "", f"Not run yet: `{command}`.", ""]
            continue
        with open(path) as f:
            d = json.load(f)
        table = d.get("table") or (_step_time_table(d) if "rows" in d else "")
        if d.get("added_rows"):  # rows run later beside the kept ones (`--add-to`)
            command += "".join(f"`, then `{c}" for c in _added_commands(d, command, fname))
        out += [f"### {title}", "", f"`{command}` — {_describe(d)}.", "", "```", table.rstrip(),
                "```", ""]
    out.append(END)
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--print", action="store_true")
    args = p.parse_args(argv)
    block = render()
    if args.print:
        print(block)
        return
    with open(README) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"README has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(README, "w") as f:
        f.write(head + block + tail)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
