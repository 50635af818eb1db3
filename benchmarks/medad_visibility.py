"""MedAD lesion visibility: what `min_cnr` keeps and what a reader sees at each contrast.

    python -m benchmarks.medad_visibility [--sheet docs/screenshots/medad_lesions_by_cnr.png]

Lesions drawn without any visibility rule (min_cnr 0: anywhere in the tissue) on every
shipped normal base at 96 px, through the centers, give the contrast-to-noise ratio that
the bare drawing reaches per modality. The sheet shows a seeded sample of them by CNR
band, each lesion as acquired and with its outline, so a reader can judge where lesions
stop being visible; the review behind the default 2.5 is in docs/medad.md. The second
table is what each threshold costs at the demo's settings, as a ratio of the cases kept
without a threshold in the same process. Pure numpy / scikit-image; no model.
"""

import argparse
from collections import Counter

import numpy as np
import polars as pl

from synth.medad.bases import decode_png, load_allowlist, load_bases
from synth.medad.cases import CaseSettings, build_cases

BANDS = ((0.0, 1.0), (1.0, 2.5), (2.5, 3.5), (3.5, float("inf")))


def drawn_lesions(bases, size: int) -> list[dict]:
    """Every lesion of an all-abnormal plan with no visibility rule."""
    s = CaseSettings(
        image_size=size, cases_per_base=3, abnormal_rate=1.0, min_cnr=0.0, eval_subject_share=0.0
    )
    cases, _, _ = build_cases(bases, s)
    out = []
    for r in cases.filter(pl.col("split") != "real_anomaly").iter_rows(named=True):
        image, mask = decode_png(r["image_png"]), decode_png(r["mask_png"])
        for f in r["lesions"]:
            out.append({**f, "case": r, "image": image, "mask": mask == f["label"]})
    return out


def sheet(lesions: list[dict], path: str, per_band: int = 3) -> None:
    from assets.plots import contact_sheet_figure

    rng = np.random.default_rng(0)
    panels = []
    for lo, hi in BANDS:
        band = [x for x in lesions if lo <= x["cnr"] < hi]
        for i in rng.permutation(len(band))[:per_band]:
            x = band[i]
            name = f"CNR {x['cnr']:.1f} {x['case']['base_id'][:16]}"
            panels += [{"image": x["image"], "label": name}]
            panels += [{"image": x["image"], "mask": x["mask"], "label": f"{x['size_class']}"}]
    fig = contact_sheet_figure(
        panels,
        "MedAD lesions by contrast-to-noise, as acquired and outlined; rows: CNR < 1, "
        "1-2.5, 2.5-3.5, >= 3.5",
        2 * per_band,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"sheet: {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 2.0, 2.5, 3.0])
    ap.add_argument("--sheet", default="", help="write the reader's sheet (PNG) here")
    a = ap.parse_args(argv)
    bases, _ = load_bases(load_allowlist(), a.size)
    lesions = drawn_lesions(bases, a.size)
    print(f"command: python -m benchmarks.medad_visibility --size {a.size}")
    print(f"\n{len(lesions)} lesions drawn with no visibility rule, {a.size} px")
    print("| modality | lesions | CNR p10 | p25 | median | share < 2.5 |")
    print("|---|---:|---:|---:|---:|---:|")
    by_modality: dict[str, list[float]] = {}
    for x in lesions:
        by_modality.setdefault(x["case"]["modality"], []).append(x["cnr"])
    for m, v in sorted(by_modality.items()):
        q = np.percentile(v, [10, 25, 50])
        print(
            f"| {m} | {len(v)} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} | "
            f"{np.mean(np.asarray(v) < 2.5):.2f} |"
        )
    demo = {"image_size": a.size, "cases_per_base": 1}
    base_kept = build_cases(bases, CaseSettings(**demo, min_cnr=0.0))[0].height
    print("\nwhat each threshold costs (demo settings; baseline: min_cnr 0 in this process)")
    print("| min_cnr | planned | kept | kept vs baseline | not visible | no spot that shows |")
    print("|---:|---:|---:|---:|---:|---:|")
    for t in [0.0, *a.thresholds]:
        kept, rejected, n = build_cases(bases, CaseSettings(**demo, min_cnr=t))
        why = Counter(rejected["reason"].to_list()) if rejected.height else Counter()
        print(
            f"| {t} | {n} | {kept.height} | {kept.height / base_kept:.2f}x | "
            f"{why['lesion_not_visible']} | {why['no_room_for_lesion']} |"
        )
    if a.sheet:
        sheet(lesions, a.sheet)


if __name__ == "__main__":
    main()
