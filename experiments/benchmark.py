"""metagrad's benchmark: speed and memory ratios measured in one run.

Run `python -m experiments.benchmark --help`. Each section lives in its own
module exposing `add_arguments(parser)` (optional) and `run(args) -> list[dict]`;
this script runs the requested sections and prints their rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# section name -> module implementing it.
SECTIONS = {
    "dotprod": "experiments.bench_dotprod",
    "meta": "experiments.bench_meta",
    "reptile": "experiments.bench_reptile",
    "grad_share": "experiments.bench_grad_share",
    "real_models": "experiments.bench_real_models",
    "memory": "experiments.bench_memory",
    "aggregators": "experiments.bench_aggregators",
}


def _available_sections():
    found = {}
    for name, module in SECTIONS.items():
        try:
            found[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return found


def main(argv=None):
    sections = _available_sections()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", choices=sorted(sections), default=None, help="sections to run"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    for module in sections.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(argv)
    rows = []
    for name, module in sections.items():
        if args.only is not None and name not in args.only:
            continue
        print(f"== {name} ==", flush=True)
        section_rows = module.run(args)
        for row in section_rows:
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.extend({"section": name, **row} for row in section_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
