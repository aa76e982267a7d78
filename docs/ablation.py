"""Print the ablation table of docs/ablation.md: single-dimension scaling at the cost of compound scaling.

    python docs/ablation.py            # mobilenet_v2 and resnet50 at phi = 1 and 2

Each row is a plan (no weights are built); depth-only, width-only and resolution-only rows are solved
to the MACs of the compound row with ``Planner.solve``.
"""

from __future__ import annotations

import argparse

import compscale
from compscale.checkpoint import load_model


def rows(model_name: str, phi: float) -> list[tuple[str, str, str, float, float, float]]:
    planner = compscale.Planner(load_model(model_name))
    compound = planner.plan(phi)
    assert compound.macs is not None
    out = []
    for label, p in [("compound", compound)] + [
        (f"{dim} only", planner.solve(compound.macs, vary=dim)) for dim in ("depth", "width", "resolution")
    ]:
        assert p.macs is not None and p.params is not None
        mults = f"d={p.depth:.2f} w={p.width:.2f} r={p.resolution:.2f}"
        out.append((label, mults, f"{p.input_size[0]}", p.params / 1e6, p.macs / 1e9, p.macs / planner.base_macs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--phi", type=float, nargs="*", default=[1.0, 2.0])
    args = parser.parse_args()
    for name in args.models:
        for phi in args.phi:
            print(f"\n{name}, phi={phi:g}")
            print("| scaling | multipliers | input | params (M) | GMACs | x base |\n|---|---|---|---|---|---|")
            for label, mults, size, params, gmacs, ratio in rows(name, phi):
                print(f"| {label} | {mults} | {size} | {params:.2f} | {gmacs:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
