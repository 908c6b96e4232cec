"""Build the benchmark reference model (random-weight Llama, HF format) into a directory.

    python benchmarks/make_reference_model.py [OUT_DIR] [--seed 0] [--force]

OUT_DIR defaults to ~/.cache/sluice/reference-model, the directory that
`sluice bench throughput reference` uses. Re-running is a no-op once the model is built.
See sluice/bench/reference_model.py for the exact shape.
"""

from __future__ import annotations

import argparse
import sys
import time

from sluice.bench.reference_model import (DEFAULT_SEED, default_reference_dir,
                                          ensure_reference_model, is_built)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=None,
                        help=f"Output directory (default {default_reference_dir()}).")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="Weight seed.")
    parser.add_argument("--force", action="store_true", help="Rebuild even if present.")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or default_reference_dir()
    if is_built(out_dir, args.seed) and not args.force:
        print(f"Reference model already built at {out_dir}")
        return 0
    start = time.perf_counter()
    path = ensure_reference_model(out_dir, seed=args.seed, force=args.force)
    print(f"Built reference model at {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
