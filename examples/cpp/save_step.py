"""Save one transformer step of an hpedge package for the C++ samples.

    python examples/cpp/save_step.py PACKAGE STEP_DIR [--prompt "a 3 on the left and a 7 on the right"]

Writes STEP_DIR/step.txt and raw float32 tensors: the inputs of the package's transformer (text encoded
by the package, seeded noise) and the output that hpedge's Python runtime (ONNX Runtime) computes.
"""

from __future__ import annotations

import argparse

from hpedge.runtime import Package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("step_dir")
    ap.add_argument("--prompt", default="a 3 on the left and a 7 on the right")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sigma", type=float, default=1.0, help="noise level of the step (1 = first step)")
    ap.add_argument("--variant", default="auto", help="transformer variant: int4_cpu, int4, fp32 (auto: int4_cpu)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    pkg = Package(args.package, variant=args.variant, device="cpu")
    out = pkg.save_step(args.step_dir, args.prompt, seed=args.seed, sigma=args.sigma, overwrite=args.overwrite)
    print(f"wrote {out}/step.txt (model {pkg.variants[pkg.variant]})")


if __name__ == "__main__":
    main()
