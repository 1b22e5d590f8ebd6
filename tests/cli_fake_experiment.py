"""A stand-in experiment for the command line's tests: no JAX, importable by worker processes.

Its behaviour follows the name it runs under (its output directory's name): ``fails`` raises,
``stop`` raises KeyboardInterrupt (as Ctrl-C does); any other name prints a line, writes one
to the stderr file descriptor (as XLA's C++ logging does) and returns one row that depends
on the seed.
"""

import os
import pathlib

DESCRIPTION = "a stand-in experiment"
LONG = True


def run(out_dir, *, budget="quick", seed=0, progress=True, args=None):
    del budget, args
    name = pathlib.Path(out_dir).name
    if name == "fails":
        raise RuntimeError("boom")
    if name == "stop":
        raise KeyboardInterrupt
    print(f"hello from {name}, progress={progress}", flush=True)
    os.write(2, f"fd-level line from {name}\n".encode())
    (pathlib.Path(out_dir) / "out.txt").write_text(name)
    return [{"method": name, "value": float(seed * 10 + len(name))}]
