"""Write the uniform-precision architecture with the same sites as a given architecture.json.

    python tools/uniform_arch.py runs/x/search/architecture.json 3 uniform3.json

Every encoder group gets the given bits; embeddings and head keep theirs (the baseline differs from the
searched model only where the search chose). Prints the exact sizes.
"""
from __future__ import annotations

import argparse
import json
import sys

from search.budget import uniform
from supernet import Architecture


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("architecture")
    p.add_argument("bits", type=int)
    p.add_argument("out")
    args = p.parse_args()
    try:
        arch = uniform(Architecture.load(args.architecture), args.bits)
        arch.save(args.out)
    except (OSError, ValueError) as e:  # a missing or malformed file, bits the format cannot hold, an unwritable out
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(arch.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
