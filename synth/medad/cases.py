"""MedAD cases: synthetic lesions inserted into real base images at known positions,
then each case passed through a seeded acquisition-center profile.

The saved label mask (0 = background, k = lesion k) is the single source of truth for
every answer downstream. A lesion is drawn only at a spot where it stands out, and a case
is kept only if every lesion is still visible after the center transform: contrast-to-noise
ratio against a surrounding ring of tissue at least `min_cnr`, measured on the saved 8-bit
image.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
from pydantic import BaseModel, Field
from scipy import ndimage as ndi

from synth.medad.bases import BaseImage, decode_png, encode_png
from synth.records import LINEAGE_SCHEMA, Provenance, Rejected, content_id, frame, rejected_frame

# What a lesion looks like, per modality. Each finding: (name, direction of contrast).
FINDINGS: dict[str, list[tuple[str, str]]] = {
    "MRI": [("hypointense mass", "dark")],
    "MRI/bright": [("hyperintense lesion", "bright")],  # diffusion and EPI sequences
    "CT": [("hyperdense area", "bright"), ("hypodense area", "dark")],
    "ultrasound": [("hypoechoic nodule with posterior enhancement", "dark")],
    "fundus photography": [("haemorrhage", "dark"), ("hard exudate", "bright")],
    "histopathology": [("dark cell cluster", "dark"), ("pale cell cluster", "bright")],
}
# The characterisation options per modality: each modality's findings in both contrast
# directions, so that every option could be seen in that kind of image and the right one
# is told by what the image shows (a bright or a dark lesion), not by the modality.
FINDING_OPTIONS: dict[str, tuple[str, ...]] = {
    "MRI": ("hypointense mass", "hyperintense lesion"),
    "CT": ("hyperdense area", "hypodense area"),
    "ultrasound": ("hypoechoic nodule with posterior enhancement", "hyperechoic nodule"),
    "fundus photography": ("haemorrhage", "hard exudate"),
    "histopathology": ("dark cell cluster", "pale cell cluster"),
}
ALL_FINDINGS = sorted(
    {name for fs in FINDINGS.values() for name, _ in fs}
    | {name for names in FINDING_OPTIONS.values() for name in names}
)
DIRECTION = {name: d for fs in FINDINGS.values() for name, d in fs}
SIZE_CLASSES = ("small", "medium", "large")
# Equivalent diameter as a fraction of the image side: below 0.07 small, below 0.12 medium.
SIZE_EDGES = (0.07, 0.12)
RADIUS_RANGE = {"small": (0.022, 0.032), "medium": (0.038, 0.052), "large": (0.066, 0.085)}
GRID = (
    ("upper left", "upper centre", "upper right"),
    ("middle left", "centre", "middle right"),
    ("lower left", "lower centre", "lower right"),
)
CELLS = tuple(c for row in GRID for c in row)


def finding_pool(modality: str, sequence: str) -> list[tuple[str, str]]:
    if modality == "MRI" and any(k in sequence.lower() for k in ("diffusion", "epi")):
        return FINDINGS["MRI/bright"]
    return FINDINGS.get(modality, [("focal lesion", "dark")])


def size_class(equiv_diameter: float, side: int) -> str:
    frac = equiv_diameter / side
    return SIZE_CLASSES[int(frac >= SIZE_EDGES[0]) + int(frac >= SIZE_EDGES[1])]


def grid_cell(cy: float, cx: float, side: int) -> str:
    return GRID[min(int(3 * cy / side), 2)][min(int(3 * cx / side), 2)]


class CaseSettings(BaseModel):
    """How MedAD cases are made (also the `medad_cases` run config)."""

    image_size: int = Field(128, description="side of the square case image, pixels")
    centers: int = Field(
        4, description="acquisition centers; the last `heldout_centers` are held out"
    )
    heldout_centers: int = 1
    cases_per_base: int = Field(2, description="cases per normal base image and center")
    abnormal_rate: float = Field(0.5, description="share of planned cases that get lesions")
    max_lesions: int = 3
    shift_severity: float = Field(1.0, description="scales every center's departure from the base")
    heldout_severity: float = Field(1.5, description="severity of the held-out centers")
    min_cnr: float = Field(
        2.5,
        description="a lesion must keep this contrast-to-noise ratio after the center "
        "(2.5: where a reader sees it on the shipped bases, `python -m "
        "benchmarks.medad_visibility`)",
    )
    eval_subject_share: float = Field(
        0.34,
        description="share of each modality's subjects held out for evaluation (test, "
        "held-out center, real-slice negatives); a modality with one subject stays in train",
    )
    seed: int = 0


@dataclass
class CenterProfile:
    """One acquisition center: resolution loss, blur, bias field, gain/gamma, colour cast,
    noise and compression, each scaled by the center's severity."""

    center: str
    heldout: bool
    severity: float
    downsample: float
    blur_sigma: float
    bias: float
    gain: float
    gamma: float
    colour_cast: tuple[float, float, float]
    noise_sigma: float
    jpeg_quality: int  # 0 = no compression

    @staticmethod
    def draw(index: int, heldout: bool, severity: float, seed: int) -> CenterProfile:
        rng = np.random.default_rng([seed, 7919, index])
        s = severity
        return CenterProfile(
            center=center_names(index + 1)[index],
            heldout=heldout,
            severity=s,
            downsample=float(1.0 + rng.uniform(0.0, 1.0) * s),
            blur_sigma=float(rng.uniform(0.0, 0.9) * s),
            bias=float(rng.uniform(0.0, 0.25) * s),
            gain=float(1.0 + rng.uniform(-0.15, 0.15) * s),
            gamma=float(np.exp(rng.uniform(-0.25, 0.25) * s)),
            colour_cast=tuple(float(1.0 + rng.uniform(-0.1, 0.1) * s) for _ in range(3)),
            noise_sigma=float(rng.uniform(0.01, 0.04) * s),
            jpeg_quality=int(95 - rng.uniform(0, 45) * s) if rng.random() < 0.5 else 0,
        )

    def apply(self, img: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
        from skimage.transform import resize

        side = img.shape[0]
        out = img.astype(np.float32)
        if self.downsample > 1.01:
            small = max(8, int(round(side / self.downsample)))
            out = resize(out, (small, small) + out.shape[2:], order=1, anti_aliasing=True)
            out = resize(out, (side, side) + out.shape[2:], order=1)
        if self.blur_sigma > 0.05:
            sig = (self.blur_sigma, self.blur_sigma) + (0,) * (out.ndim - 2)
            out = ndi.gaussian_filter(out, sig)
        if self.bias > 0 and modality in ("MRI", "ultrasound"):  # coil / depth gain field
            yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
            field = 1.0 + self.bias * (0.8 * xx + 0.6 * yy + 0.5 * xx * yy)
            out = out * (field[..., None] if out.ndim == 3 else field)
        out = np.clip(out * self.gain, 0.0, 1.0) ** self.gamma
        if out.ndim == 3:
            out = out * np.asarray(self.colour_cast, np.float32)
        sigma = self.noise_sigma
        if modality == "MRI":  # Rician: magnitude of a complex signal with Gaussian noise
            out = np.sqrt(
                (out + rng.normal(0, sigma, out.shape)) ** 2 + rng.normal(0, sigma, out.shape) ** 2
            )
        elif modality == "ultrasound":  # multiplicative speckle
            out = out * (1.0 + rng.normal(0, 3 * sigma, out.shape))
        else:
            out = out + rng.normal(0, sigma, out.shape)
        out = np.clip(out, 0.0, 1.0)
        if self.jpeg_quality:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(np.round(out * 255).astype(np.uint8)).save(
                buf, format="JPEG", quality=self.jpeg_quality
            )
            out = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float32) / 255.0
        return out.astype(np.float32)


def center_profiles(s: CaseSettings) -> list[CenterProfile]:
    if not 0 <= s.heldout_centers < s.centers:
        raise ValueError(
            f"heldout_centers={s.heldout_centers} must be at least 0 and below centers={s.centers}"
        )
    first_heldout = s.centers - s.heldout_centers
    return [
        CenterProfile.draw(
            i,
            i >= first_heldout,
            (s.heldout_severity if i >= first_heldout else s.shift_severity),
            s.seed,
        )
        for i in range(s.centers)
    ]


# --- lesions ---------------------------------------------------------------------------


def lesion_shape(side: int, cy: float, cx: float, radius: float, rng: np.random.Generator):
    """An irregular soft-edged blob: an ellipse whose radius wobbles with a few random
    harmonics of the angle, blurred. Returns (alpha in [0, 1], binary mask = alpha > 0.5)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    theta = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.7, 1.0)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / aspect
    ang = np.arctan2(v, u)
    wobble = sum(
        rng.uniform(0.05, 0.18) / k * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
        for k in range(2, 6)
    )
    r = np.hypot(u, v) / (radius * (1.0 + wobble))
    alpha = ndi.gaussian_filter((r <= 1.0).astype(np.float32), max(0.8, radius / 6))
    return alpha, alpha > 0.5


# RGB findings: the colour a lesion is blended toward, and whether its texture is mottled.
COLOUR_FINDINGS = {
    "haemorrhage": ((0.35, 0.05, 0.03), True),
    "hard exudate": ((0.97, 0.92, 0.5), False),
    "dark cell cluster": ((0.22, 0.12, 0.35), True),
    "pale cell cluster": ((0.96, 0.93, 0.95), False),
}


def paint(img: np.ndarray, alpha: np.ndarray, finding: str, rng: np.random.Generator) -> np.ndarray:
    """Blend one lesion of the named finding into the image (float, [0, 1])."""
    a = alpha[..., None] if img.ndim == 3 else alpha
    mottle = 1.0 + ndi.gaussian_filter(rng.normal(0, 0.25, alpha.shape), 1.0).astype(np.float32)
    mottle = mottle[..., None] if img.ndim == 3 else mottle
    k = rng.uniform(0.55, 0.8)  # lesion contrast
    if finding in COLOUR_FINDINGS:  # blend toward the finding's colour
        target, mottled = COLOUR_FINDINGS[finding]
        return (
            img * (1 - k * a) + np.asarray(target, np.float32) * (mottle if mottled else 1) * k * a
        )
    if finding == "hypoechoic nodule with posterior enhancement":
        out = img * (1 - k * a * mottle)
        # Enhancement below the nodule: sound passes the fluid-like nodule unattenuated.
        column = alpha.max(axis=0)
        bottom = np.max(np.where(alpha > 0.5)[0]) if (alpha > 0.5).any() else 0
        rows = np.arange(alpha.shape[0])[:, None]
        fade = np.clip(1.0 - (rows - bottom) / (0.25 * alpha.shape[0]), 0, 1) * (rows > bottom)
        return out * (1 + 0.35 * fade * column[None, :])
    if DIRECTION.get(finding) == "bright":
        return img + k * a * mottle * (1.0 - img)
    return img * (1 - k * a * mottle)


def lesion_cnr(
    img: np.ndarray, lesion: np.ndarray, tissue: np.ndarray, others: np.ndarray
) -> float:
    """Contrast-to-noise against a surrounding ring of tissue: the distance between the
    mean inside and the ring's mean over the ring's RMS deviation. A grey image is read
    as is; a colour one in CIELAB, so that a purple cluster on brown stain counts as the
    contrast a reader sees although its luminance is close."""
    if img.ndim == 3:
        from skimage.color import rgb2lab

        img = rgb2lab(np.clip(img, 0.0, 1.0))
    else:
        img = img[..., None]
    ring = ndi.binary_dilation(lesion, iterations=5) & ~ndi.binary_dilation(lesion, iterations=1)
    if (ring & tissue & ~others).sum() >= 8:
        ring &= tissue & ~others
    inside, bg = img[lesion], img[ring]
    spread = np.sqrt(((bg - bg.mean(axis=0)) ** 2).sum(axis=1).mean())
    return float(np.linalg.norm(inside.mean(axis=0) - bg.mean(axis=0)) / (spread + 1e-3))


def lesion_facts(mask: np.ndarray, side: int) -> list[dict]:
    """Per-lesion facts recomputed from a label mask alone."""
    facts = []
    for label in sorted(int(v) for v in np.unique(mask) if v):
        m = mask == label
        area = int(m.sum())
        cy, cx = ndi.center_of_mass(m)
        d = float(2.0 * np.sqrt(area / np.pi))
        facts.append(
            {
                "label": label,
                "area": area,
                "centroid_y": round(float(cy), 2),
                "centroid_x": round(float(cx), 2),
                "equiv_diameter": round(d, 2),
                "size_class": size_class(d, side),
                "cell": grid_cell(cy, cx, side),
            }
        )
    return facts


# --- cases -----------------------------------------------------------------------------

LESION_DTYPE = pl.Struct(
    {
        "label": pl.Int64,
        "area": pl.Int64,
        "centroid_y": pl.Float64,
        "centroid_x": pl.Float64,
        "equiv_diameter": pl.Float64,
        "size_class": pl.Utf8,
        "cell": pl.Utf8,
        "cnr": pl.Float64,
    }
)
CASE_SCHEMA: dict[str, pl.DataType] = {
    **LINEAGE_SCHEMA,
    "plan_index": pl.Int64(),
    "base_id": pl.Utf8(),
    "modality": pl.Utf8(),
    "sequence": pl.Utf8(),
    "anatomy": pl.Utf8(),
    "center": pl.Utf8(),
    "subject_id": pl.Utf8(),
    "split": pl.Utf8(),
    "abnormal": pl.Boolean(),
    "finding": pl.Utf8(),
    "lesion_count": pl.Int64(),
    "lesions": pl.List(LESION_DTYPE),
    "image_png": pl.Binary(),
    "mask_png": pl.Binary(),
    "tissue_png": pl.Binary(),
}


def eval_subjects(bases: list[BaseImage], s: CaseSettings) -> set[str]:
    """The subjects held out for evaluation: a seeded `eval_subject_share` of each
    modality's normal subjects, leaving at least one of them to train on (all of them at
    share 1.0) and holding out at least one where there are two or more."""
    by_modality: dict[str, set[str]] = {}
    for b in bases:
        if b.role == "normal":
            by_modality.setdefault(b.modality, set()).add(b.subject_id)
    rng = np.random.default_rng([s.seed, 7919])
    held: set[str] = set()
    for modality in sorted(by_modality):
        subjects = sorted(by_modality[modality])
        n = len(subjects)
        k = n if s.eval_subject_share >= 1 else min(round(s.eval_subject_share * n), n - 1)
        if s.eval_subject_share > 0 and n >= 2:
            k = max(k, 1)
        held |= {subjects[i] for i in rng.permutation(n)[:k]}
    return held


def plan_cases(bases: list[BaseImage], s: CaseSettings) -> list[dict]:
    """The cases to make, each with its split, decided by subject so that no subject is on
    both sides: a training subject's bases at the in-distribution centers (`train`); an
    evaluation subject's at the in-distribution centers (`test`) and the held-out ones
    (`heldout_center`); a seeded exact share of these abnormal. Then the real slice, as
    acquired (no center): every real-anomaly image, and as its negatives the evaluation
    subjects' normal images."""
    centers = center_profiles(s)
    held = eval_subjects(bases, s)
    normal = [b for b in bases if b.role == "normal"]
    plan = []
    for c in centers:
        for b in normal:
            if c.heldout and b.subject_id not in held:
                continue  # a training subject seen through a new center is not held out
            split = ("heldout_center" if c.heldout else "test") if b.subject_id in held else "train"
            plan += [
                {"base": b, "center": c, "k": k, "split": split} for k in range(s.cases_per_base)
            ]
    rng = np.random.default_rng([s.seed, 104729])
    abnormal = set(rng.permutation(len(plan))[: int(round(s.abnormal_rate * len(plan)))].tolist())
    for i, p in enumerate(plan):
        p["abnormal"] = i in abnormal
    plan += [
        {
            "base": b,
            "center": None,
            "k": 0,
            "abnormal": b.role == "real_anomaly",
            "split": "real_anomaly",
        }
        for b in bases
        if b.role == "real_anomaly" or b.subject_id in held
    ]
    return plan


# Where a drawn lesion must stand out before the center acts, as a multiple of min_cnr: the
# center's blur and noise then take some of it, and the final check reads what is left.
PLACEMENT_MARGIN = 1.5


def _place_lesions(
    base: BaseImage, n: int, finding: str, min_cnr: float, rng: np.random.Generator, side: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Label mask and painted image of `n` non-touching lesions of `finding` inside the
    tissue, each at a spot where it shows (dark tissue hides a dark mass, bright tissue a
    bright lesion), or None."""
    mask = np.zeros((side, side), np.int32)
    img = base.image.copy()
    for label in range(1, n + 1):
        for _ in range(60):
            size = SIZE_CLASSES[rng.integers(3)]
            radius = rng.uniform(*RADIUS_RANGE[size]) * side
            room = ndi.binary_erosion(base.tissue, iterations=max(1, int(radius) + 1))
            ys, xs = np.nonzero(room)
            if not len(ys):
                continue
            j = rng.integers(len(ys))
            alpha, lesion = lesion_shape(side, ys[j], xs[j], radius, rng)
            inside = (lesion & base.tissue).sum() / max(lesion.sum(), 1)
            clear = not (ndi.binary_dilation(lesion, iterations=3) & (mask > 0)).any()
            if lesion.sum() < 12 or inside < 0.95 or not clear:
                continue
            painted = np.clip(paint(img, alpha, finding, rng), 0.0, 1.0)
            if lesion_cnr(painted, lesion, base.tissue, mask > 0) >= PLACEMENT_MARGIN * min_cnr:
                mask[lesion] = label
                img = painted
                break
        else:
            return None
    return mask, img


def make_case(p: dict, s: CaseSettings, index: int) -> tuple[dict | None, Rejected | None]:
    base: BaseImage = p["base"]
    center: CenterProfile | None = p["center"]
    side = s.image_size
    rng = np.random.default_rng([s.seed, 31, index])
    case_id = content_id(
        "medad_case", base.base_id, center.center if center else "", p["k"], s.seed
    )
    payload = {"base_id": base.base_id, "center": center.center if center else "", "k": p["k"]}

    def reject(reason: str, detail: str) -> tuple[None, Rejected]:
        return None, Rejected(
            case_id, "cases", reason, detail, [base.base_id], "plan", index, payload
        )

    img = base.image.copy()
    mask = np.zeros((side, side), np.int32)
    finding = ""
    if base.role == "real_anomaly":
        finding = base.finding
        if base.lesion is not None:  # the source's own mask: each lesion a label
            mask = ndi.label(base.lesion)[0].astype(np.int32)
    elif p["abnormal"]:
        n = 1 + int(rng.choice(s.max_lesions, p=_count_probs(s.max_lesions)))
        pool = finding_pool(base.modality, base.sequence)
        finding = pool[rng.integers(len(pool))][0]
        placed = _place_lesions(base, n, finding, s.min_cnr, rng, side)
        if placed is None:
            return reject(
                "no_room_for_lesion",
                f"case {case_id} ({base.base_id}): {n} lesions of {finding} do not fit inside "
                f"the tissue mask at spots where they show (CNR {PLACEMENT_MARGIN} x min_cnr "
                f"{s.min_cnr} before the center)",
            )
        mask, img = placed
    if center is not None:
        img = center.apply(img, base.modality, rng)
    png = encode_png(img)
    saved = decode_png(png).astype(np.float32) / 255.0
    lesions = lesion_facts(mask, side)
    tissue = base.tissue if base.tissue is not None else np.ones((side, side), bool)
    for f in lesions:
        f["cnr"] = round(lesion_cnr(saved, mask == f["label"], tissue, mask > 0), 3)
    # A real lesion is what the source marked, however faint: only drawn ones must show.
    faint = [f for f in lesions if f["cnr"] < s.min_cnr and base.role != "real_anomaly"]
    if faint:
        return reject(
            "lesion_not_visible",
            f"case {case_id} ({base.base_id}, {center.center}): lesion {faint[0]['label']} has "
            f"CNR {faint[0]['cnr']} < min_cnr {s.min_cnr} after the center transform",
        )
    params = {"center": asdict(center) if center else None, "k": p["k"]}
    row = {
        "record_id": case_id,
        "parent_ids": [base.base_id],
        "provenance": Provenance(
            "procedural", template_id="medad_case", params_json=json.dumps(params), seed=s.seed
        ).as_dict(),
        "plan_index": index,
        "base_id": base.base_id,
        "modality": base.modality,
        "sequence": base.sequence,
        "anatomy": base.anatomy,
        "center": center.center if center else "source",
        "subject_id": base.subject_id,
        "split": p["split"],
        "abnormal": base.role == "real_anomaly" or bool(lesions),
        "finding": finding,
        "lesion_count": len(lesions),
        "lesions": lesions,
        "image_png": png,
        "mask_png": encode_png(mask.astype(np.uint8)),
        "tissue_png": encode_png(tissue.astype(np.uint8)),
    }
    return row, None


def _count_probs(max_lesions: int) -> np.ndarray:
    w = np.array([0.6, 0.25, 0.15, 0.1, 0.05][:max_lesions])
    return w / w.sum()


def build_cases(
    bases: list[BaseImage],
    s: CaseSettings,
    log: Callable[[str], None] | None = None,
    centers: set[str] | None = None,
    real_anomalies: bool = True,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(kept, rejected, planned) for the whole plan, or for one shard of it: the cases of
    `centers` (None = every center), with or without the real-anomaly cases. Plan indices
    stay those of the whole plan, so shards concatenate into the unsharded result."""
    from synth.progress import Progress

    plan = [
        (i, p)
        for i, p in enumerate(plan_cases(bases, s))
        if (p["center"] is None and real_anomalies)
        or (p["center"] is not None and (centers is None or p["center"].center in centers))
    ]
    progress = Progress(len(plan), "medad cases", log)
    kept, rejected = [], []
    for i, p in plan:
        row, rej = make_case(p, s, i)
        (kept if row else rejected).append(row or rej)
        progress.update()
    progress.close()
    return frame(kept, CASE_SCHEMA), rejected_frame(rejected), len(plan)


def center_names(n: int) -> list[str]:
    return [f"center_{i}" for i in range(n)]
