"""Base images for MedAD: a reviewed allow-list of real medical images that ship inside
PyPI wheels, loaded to a square float image in [0, 1] with a tissue mask.

Loaders are pluggable (`register_loader`): an allow-list entry names its loader, so a
local folder of images (`folder`) or a Hugging Face dataset (`hf`, a local path or a
dataset id) such as BraTS slices or ISIC lesions can be added beside the shipped files.
DICOM headers are de-identified on load: patient-identifying tags are dropped or
replaced and only the cleaned header travels on.
"""

from __future__ import annotations

import importlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import yaml

ALLOWLIST = Path(__file__).with_name("bases.yaml")
ROLES = ("normal", "real_anomaly")
REQUIRED = ("id", "role", "loader", "modality", "anatomy", "licence")

# Patient characteristics the basic profile removes as well: they narrow down who a
# patient is without naming them.
PATIENT_TRAITS = (
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "PregnancyStatus",
    "PatientState",
    "SmokingStatus",
    "Occupation",
)
# Patient-identifying DICOM attributes (a subset of the PS3.15 Annex E basic profile that
# covers what these files carry): removed, and their values never reach an output.
PHI_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientMotherBirthName",
    "MilitaryRank",
    "EthnicGroup",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "AccessionNumber",
    "StudyID",
    "StationName",
    "DeviceSerialNumber",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
    "StudyDescription",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "AdditionalPatientHistory",
    "PatientComments",
    "ImageComments",
    "StudyComments",
    "SeriesDescription",
    "ProtocolName",
    "DerivationDescription",
    "RequestedProcedureID",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    *PATIENT_TRAITS,
)
# Removed, but not scanned for: their values ("SHOULDER", "abdomen^liver", a weight of
# "70", sex "M") describe the study or a trait rather than identify anyone, and would
# match ordinary metadata.
FREE_TEXT_TAGS = frozenset(
    {
        *PATIENT_TRAITS,
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "DerivationDescription",
        "RequestedProcedureDescription",
        "PerformedProcedureStepDescription",
        "ImageComments",
        "StudyComments",
    }
)
UID_TAGS = (
    "InstanceCreatorUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "MediaStorageSOPInstanceUID",
    "StorageMediaFileSetUID",  # Siemens writes the scanner's serial number into it
    "ReferencedSOPInstanceUID",
    "IrradiationEventUID",
)


class AllowListError(ValueError):
    """A bad allow-list entry, named by its id (or position) and field."""


@dataclass
class BaseImage:
    base_id: str
    entry_id: str
    role: str
    modality: str
    sequence: str
    anatomy: str
    licence: str
    source: str  # package-relative path or dataset id, never a patient identifier
    image: np.ndarray  # float32 HxW or HxWx3 in [0, 1]
    tissue: np.ndarray | None  # bool HxW; None for a real-anomaly image
    finding: str = ""
    header: dict[str, Any] = field(default_factory=dict)  # de-identified DICOM header
    lesion: np.ndarray | None = None  # bool HxW: a real anomaly's mask from its source

    @property
    def subject_id(self) -> str:
        return subject_of(self.base_id)


def subject_of(base_id: str) -> str:
    """The subject a base image comes from: its id without a volume's slice suffix
    (`mni152_t1-z80` -> `mni152_t1`), so the slices of one volume share a subject and
    splits by subject never put one person's anatomy on both sides."""
    return re.sub(r"-z\d+$", "", base_id)


def load_allowlist(path: str | Path = ALLOWLIST) -> list[dict[str, Any]]:
    data = yaml.safe_load(Path(path).read_text())
    entries = data.get("bases") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise AllowListError(f"{path}: `bases` must be a non-empty list")
    seen: set[str] = set()
    for i, e in enumerate(entries):
        name = e.get("id", f"#{i}") if isinstance(e, dict) else f"#{i}"
        if not isinstance(e, dict):
            raise AllowListError(f"{path}: bases[{i}]: must be a mapping")
        for key in REQUIRED:
            if not e.get(key):
                raise AllowListError(f"{path}: {name}.{key}: missing")
        if e["role"] not in ROLES:
            raise AllowListError(f"{path}: {name}.role: {e['role']!r} is not one of {ROLES}")
        if e["loader"] not in LOADERS:
            raise AllowListError(
                f"{path}: {name}.loader: {e['loader']!r} is not one of {sorted(LOADERS)}"
            )
        if e["role"] == "normal" and not (e.get("tissue") or {}).get("method"):
            raise AllowListError(f"{path}: {name}.tissue.method: a normal base needs one")
        if e["role"] == "real_anomaly" and not e.get("finding"):
            raise AllowListError(f"{path}: {name}.finding: a real anomaly must say what it shows")
        if name in seen:
            raise AllowListError(f"{path}: {name}.id: repeated")
        seen.add(name)
    return entries


# --- loaders: entry -> raw images (float arrays, any range) with their source -------------


class Loaded(NamedTuple):
    """One image a loader read: its id suffix, the raw pixels, the de-identified header,
    the tissue atlas slice, and what the source says is abnormal in it (a lesion mask,
    nonzero = lesion, and a finding from its labels)."""

    suffix: str
    image: np.ndarray
    header: dict[str, Any]
    atlas: np.ndarray | None = None
    lesion: np.ndarray | None = None
    finding: str = ""


class LoadFailed(NamedTuple):
    """One file (or slice) of a source that could not be used: the rest still loads."""

    suffix: str
    reason: str
    detail: str


LOADERS: dict[str, Callable[[dict[str, Any]], Iterator[Loaded | LoadFailed]]] = {}


def register_loader(kind: str):
    def wrap(fn):
        LOADERS[kind] = fn
        return fn

    return wrap


def package_file(entry: dict[str, Any], rel: str | None = None) -> Path:
    """A file inside an installed package; a plain path for entries without a package."""
    if not entry.get("package"):
        return Path(rel or entry["path"])
    module = importlib.import_module(entry["package"])
    path = Path(module.__file__).parent / (rel or entry["path"])
    if not path.exists():
        raise AllowListError(f"{entry['id']}.path: {path} does not exist")
    return path


def _slices(volume: np.ndarray, entry: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    spec = entry.get("slices") or {"axis": 2, "at": [0.5]}
    while volume.ndim > 3:  # 4-D series: the first volume
        volume = volume[..., 0]
    for at in spec["at"]:
        k = int(round(at * (volume.shape[spec["axis"]] - 1)))
        # Radiological display: rows top to bottom, columns left to right.
        yield f"z{k}", np.rot90(np.take(volume, k, axis=spec["axis"]))


@register_loader("nifti")
def load_nifti(entry: dict[str, Any]) -> Iterator[Loaded]:
    import nibabel as nib

    volume = np.asarray(nib.load(package_file(entry)).dataobj, dtype=np.float32)
    atlas = None
    if (entry.get("tissue") or {}).get("method") == "atlas":
        atlas = sum(
            np.asarray(nib.load(package_file(entry, p)).dataobj, dtype=np.float32)
            for p in entry["tissue"]["paths"]
        )
    atlas_slices = dict(_slices(atlas, entry)) if atlas is not None else {}
    for suffix, img in _slices(volume, entry):
        yield Loaded(suffix, img, {}, atlas_slices.get(suffix))


@register_loader("npy")
def load_npy(entry: dict[str, Any]) -> Iterator[Loaded]:
    yield Loaded("", np.load(package_file(entry)).astype(np.float32), {})


@register_loader("image")
def load_image(entry: dict[str, Any]) -> Iterator[Loaded]:
    from PIL import Image

    yield Loaded("", np.asarray(Image.open(package_file(entry)), dtype=np.float32), {})


def deid_salt() -> str:
    """The secret mixed into every replacement UID ($ALIGNFOUNDRY_DEID_SALT, else one drawn
    once per installation and kept in $ALIGNFOUNDRY_HOME), so that nobody holding an
    original UID can compute its replacement and link the two."""
    import os
    import secrets

    if os.environ.get("ALIGNFOUNDRY_DEID_SALT"):
        return os.environ["ALIGNFOUNDRY_DEID_SALT"]
    home = Path(os.environ.get("ALIGNFOUNDRY_HOME") or ".alignfoundry").expanduser()
    path = home / "medad_deid_salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(16))
    return path.read_text().strip()


def deidentify(ds: Any, salt: str | None = None) -> dict[str, Any]:
    """The header without patient identifiers, after the PS3.15 basic profile for the
    attributes present: PHI attributes and private tags removed, UIDs replaced by new ones
    derived from the original and a secret salt (`deid_salt`; stable across runs of one
    installation), sequences, overlays and pixel data left out. A JSON-able dict."""
    import copy

    from pydicom.uid import generate_uid

    salt = deid_salt() if salt is None else salt
    ds = copy.deepcopy(ds)  # a shallow copy shares its elements: the input would change too
    ds.remove_private_tags()
    for name in PHI_TAGS:
        if name in ds:
            delattr(ds, name)
    for name in UID_TAGS:
        if name in ds:
            original = str(ds.data_element(name).value)
            setattr(ds, name, generate_uid(entropy_srcs=[salt, original]))
    if "PixelData" in ds:
        del ds.PixelData
    for elem in list(ds):
        if elem.VR in ("OB", "OW", "UN", "SQ") or elem.tag.group == 0x6000:
            del ds[elem.tag]
    return {
        elem.keyword: str(elem.value)
        for elem in ds
        if elem.keyword and elem.value not in (None, "")
    }


def phi_values(ds: Any) -> set[str]:
    """The identifying values a DICOM file carries (what must never reach an output)."""
    values = set()
    for name in (*PHI_TAGS, *UID_TAGS):
        if name not in ds or name in FREE_TEXT_TAGS:
            continue
        v = str(ds.data_element(name).value or "").strip()
        # A name also as it reads in prose. A bare number under 8 digits (an accession
        # "7", a study id "1") would match every count and percentage in the tables, so it
        # is scanned only as part of a longer value; a short id with letters ("1CT1") is.
        for form in {v, " ".join(v.replace("^", " ").split())}:
            if len(form) >= 8 or (len(form) >= 3 and not form.replace(".", "").isdigit()):
                values.add(form)
    return values


def _ultrasound_region(ds: Any, img: np.ndarray) -> np.ndarray:
    """Crop an ultrasound frame to its first 2-D imaging region: the rest of the frame is
    where scanners burn in names and dates."""
    for r in ds.get("SequenceOfUltrasoundRegions", []) or []:
        if int(r.get("RegionSpatialFormat", 0)) == 1:
            y0, y1 = int(r.RegionLocationMinY0), int(r.RegionLocationMaxY1)
            x0, x1 = int(r.RegionLocationMinX0), int(r.RegionLocationMaxX1)
            return img[y0 : y1 + 1, x0 : x1 + 1]
    return img


@register_loader("dicom")
def load_dicom(entry: dict[str, Any]) -> Iterator[Loaded]:
    import pydicom

    ds = pydicom.dcmread(package_file(entry))
    img = ds.pixel_array.astype(np.float32)
    if img.ndim == 3 and img.shape[-1] not in (3, 4):  # multi-frame: the middle frame
        img = img[img.shape[0] // 2]
    if ds.get("Modality") == "US":
        img = _ultrasound_region(ds, img)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        img = img.max() - img
    yield Loaded("", img, deidentify(ds))


def read_dicom_phi(entries: list[dict[str, Any]]) -> set[str]:
    """Identifying values of every DICOM file the allow-list names (for the no-PHI check)."""
    import pydicom

    values: set[str] = set()
    for e in entries:
        if e["loader"] == "dicom":
            files = [package_file(e)]
        elif e["loader"] == "folder" and Path(e["path"]).expanduser().is_dir():
            files = sorted(Path(e["path"]).expanduser().rglob("*.dcm"))
        else:
            continue
        for f in files:
            try:
                values |= phi_values(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception:  # unreadable: its loader rejects it, nothing of it travels
                continue
    return values


def _read_mask(path: Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """A lesion mask file, sliced like its image: {suffix: 2-D mask}."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        return dict(_slices(volume, entry))
    from PIL import Image

    return {"": np.asarray(Image.open(path), dtype=np.float32)}


def _findings_table(entry: dict[str, Any]) -> dict[str, str] | None:
    """The source's findings CSV (`findings`: columns `image`, `finding`; an empty finding
    is a normal image), keyed by file name; None without one."""
    if not entry.get("findings"):
        return None
    table = pl.read_csv(Path(entry["findings"]).expanduser(), infer_schema=False)
    missing = {"image", "finding"} - set(table.columns)
    if missing:
        raise AllowListError(f"{entry['id']}.findings: no column {sorted(missing)[0]!r}")
    return dict(
        zip(table["image"].to_list(), table["finding"].fill_null("").to_list(), strict=True)
    )


def _mask_path(f: Path, entry: dict[str, Any]) -> Path | None:
    """The mask beside an image, named by the entry's `mask: {from, to}` rule on the file
    name (BraTS `-t1c` -> `-seg`, ISIC `.jpg` -> `_segmentation.png`)."""
    rule = entry.get("mask")
    if not rule or rule["from"] not in f.name:
        return None
    path = f.with_name(f.name.replace(rule["from"], rule["to"]))
    return path if path.exists() else None


def _source_marks(
    entry: dict[str, Any], lesion: np.ndarray | None, finding: str
) -> tuple[np.ndarray | None, str]:
    """What a source marks abnormal in one image: its mask (None unless it shows a lesion)
    and its finding (the label's, else the entry's `mask_finding` when the mask shows one)."""
    if lesion is None or not lesion.any():
        return None, finding
    return lesion, finding or entry.get("mask_finding", "lesion (segmented)")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@register_loader("folder")
def load_folder(entry: dict[str, Any]) -> Iterator[Loaded | LoadFailed]:
    """Every image under a local folder (`path`, optional `glob`): PNG/JPEG, .npy, NIfTI
    (the entry's `slices`, several per volume) or DICOM. For a local copy of a public set:
    - BraTS-style volumes with a segmentation beside each (`mask: {from: -t1c, to: -seg}`);
    - ISIC-style images with lesion masks (`mask: {from: .jpg, to: _segmentation.png}`)
      and a CSV of diagnoses (`findings: labels.csv`, columns `image`, `finding`).
    An image whose mask shows a lesion, or whose finding is not empty, is a real anomaly
    (finding: the CSV's, else the entry's `mask_finding`), never a normal base. A slice of
    a volume with a lesion elsewhere is not used at all. Files stream one at a time, and a
    file that cannot be read fails alone, with its reason."""
    root = Path(entry["path"]).expanduser()
    if not root.is_dir():
        raise AllowListError(f"{entry['id']}.path: {root} is not a folder")
    findings = _findings_table(entry)
    masks = {m.name for m in root.glob("*") if entry.get("mask") and entry["mask"]["to"] in m.name}
    for f in sorted(root.glob(entry.get("glob", "*"))):
        name = f.name.lower()
        if f.name in masks:
            continue
        if name.endswith((".nii", ".nii.gz")):
            inner = load_nifti
        elif name.endswith(".dcm"):
            inner = load_dicom
        elif name.endswith(".npy"):
            inner = load_npy
        elif name.endswith(IMAGE_SUFFIXES):
            inner = load_image
        else:
            continue
        stem = f.name.split(".")[0]
        try:
            mask_file = _mask_path(f, entry)
            lesions = _read_mask(mask_file, entry) if mask_file else {}
            items = list(inner({**entry, "path": str(f), "package": None}))
        except Exception as exc:
            yield LoadFailed(stem, "unreadable_file", f"{f.name}: {type(exc).__name__}: {exc}")
            continue
        anomalous_subject = any(m.any() for m in lesions.values())
        finding = (findings or {}).get(f.name, "")
        for item in items:
            suffix = f"{stem}{('-' + item.suffix) if item.suffix else ''}"
            lesion = lesions.get(item.suffix)
            if lesion is not None and lesion.shape != item.image.shape[:2]:
                yield LoadFailed(
                    suffix,
                    "mask_mismatch",
                    f"{f.name}: mask {lesion.shape} vs image {item.image.shape[:2]}",
                )
                continue
            lesion, real = _source_marks(entry, lesion, finding)
            if anomalous_subject and lesion is None:
                yield LoadFailed(
                    suffix,
                    "anomalous_subject",
                    f"{f.name} {item.suffix}: no lesion in this slice, but the volume has one: "
                    "never a normal base",
                )
                continue
            yield item._replace(suffix=suffix, lesion=lesion, finding=real)


@register_loader("hf")
def load_hf(entry: dict[str, Any]) -> Iterator[Loaded]:
    """Images of a Hugging Face dataset (`dataset`: a local path or a dataset id; `split`,
    `image_column`, optional `limit`) through `datasets.load_dataset`."""
    import datasets

    ds = datasets.load_dataset(entry["dataset"], split=entry.get("split", "train"))
    column = entry.get("image_column", "image")
    if column not in ds.column_names:
        raise AllowListError(
            f"{entry['id']}.image_column: {column!r} not in the dataset's columns {ds.column_names}"
        )
    mask_column, label_column = entry.get("mask_column"), entry.get("label_column")
    normal = set(entry.get("normal_labels", []))
    for i, row in enumerate(ds.select(range(min(len(ds), entry.get("limit", len(ds)))))):
        try:
            img = np.asarray(row[column], dtype=np.float32)
            lesion = np.asarray(row[mask_column], dtype=np.float32) if mask_column else None
        except Exception as exc:  # one broken row fails alone
            yield LoadFailed(f"{i}", "unreadable_row", f"row {i}: {type(exc).__name__}: {exc}")
            continue
        label = str(row[label_column] or "") if label_column else ""
        lesion, finding = _source_marks(entry, lesion, "" if label in normal else label)
        yield Loaded(f"{i}", img, {}, None, lesion, finding)


# --- normalisation and tissue masks -----------------------------------------------------


def to_unit(img: np.ndarray) -> np.ndarray:
    """Robust rescale to [0, 1]: 1st-99.5th percentile window (RGB keeps its colours)."""
    img = img[..., :3] if img.ndim == 3 else img
    lo, hi = np.percentile(img, [1.0, 99.5])
    if hi <= lo:
        raise ValueError("constant image")
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def square(img: np.ndarray, size: int, order: int = 1) -> np.ndarray:
    """Pad to a square with the image's minimum, then resize to size x size (`order` 0:
    nearest, for masks)."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = max(h, w)
    pad = [((s - h) // 2, s - h - (s - h) // 2), ((s - w) // 2, s - w - (s - w) // 2)]
    pad += [(0, 0)] * (img.ndim - 2)
    img = np.pad(img, pad, constant_values=float(img.min()))
    return resize(img, (size, size) + img.shape[2:], order=order, anti_aliasing=order > 0).astype(
        np.float32
    )


def luminance(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], np.float32) if img.ndim == 3 else img


def tissue_mask(
    img: np.ndarray,
    method: str,
    atlas: np.ndarray | None = None,
    level: float = 0.15,
    exclude_above: float | None = None,
) -> np.ndarray:
    """Where lesions may go. `exclude_above` removes what is brighter than that (bone and
    contrast-filled vessels on a CT window), with a pixel of margin, so that a lesion
    lands in soft tissue."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    lum = luminance(img)
    if method == "atlas":
        if atlas is None:
            raise ValueError("method atlas needs the atlas maps")
        mask = atlas > 0.5 * atlas.max()
    elif method == "otsu":
        smooth = ndi.gaussian_filter(lum, 1.0)
        mask = smooth > threshold_otsu(smooth)
    elif method == "fov":  # the bright disc of a fundus photograph
        mask = lum > 0.1
    elif method == "threshold":  # soft tissue darker than Otsu's split (e.g. a shoulder MR)
        mask = ndi.gaussian_filter(lum, 1.0) > level
    elif method == "nonwhite":  # stained tissue on a pale slide: every piece of it
        mask = ndi.gaussian_filter(lum, 1.0) < 0.85
    else:
        raise ValueError(f"unknown tissue method {method!r}")
    mask = ndi.binary_fill_holes(ndi.binary_closing(mask, iterations=2))
    labels, n = ndi.label(mask)
    if n and method != "nonwhite":
        sizes = ndi.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    if exclude_above is not None:
        dense = ndi.gaussian_filter(lum, 1.0) > exclude_above
        mask &= ~ndi.binary_dilation(dense, iterations=1)
    return ndi.binary_erosion(mask, iterations=2)


def _crop(arr: np.ndarray, e: dict[str, Any]) -> np.ndarray:
    """The entry's reviewed crop (`crop: [y0, y1, x0, x1]` fractions), if any."""
    if not e.get("crop"):
        return arr
    y0, y1, x0, x1 = e["crop"]
    h, w = arr.shape[:2]
    return arr[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)]


def load_bases(
    entries: list[dict[str, Any]], size: int
) -> tuple[list[BaseImage], list[tuple[dict, str, str, str]]]:
    """(bases, failures): each failure is (entry, reason, detail, id of what failed). A
    loader streams its images; a whole entry fails only when its loader does."""

    bases, failures = [], []
    for e in entries:
        try:
            for item in LOADERS[e["loader"]](e):
                base_id = f"{e['id']}-{item.suffix}" if item.suffix else e["id"]
                if isinstance(item, LoadFailed):
                    failures.append((e, item.reason, f"{e['id']}: {item.detail}", base_id))
                    continue
                base = _base(e, item, base_id, size)
                if isinstance(base, str):
                    failures.append((e, "unusable_image", f"{base_id}: {base}", base_id))
                else:
                    bases.append(base)
        except Exception as exc:  # a missing file, an unreadable DICOM: the entry is rejected
            detail = f"{e['id']}: {type(exc).__name__}: {exc}"
            failures.append((e, "load_failed", detail, e["id"]))
    return bases, failures


def _base(e: dict[str, Any], item: Loaded, base_id: str, size: int) -> BaseImage | str:
    """The base image of one loaded item, or why it is unusable."""
    try:
        img = square(to_unit(_crop(item.image, e)), size)  # crop: burned-in text, scale bars
    except ValueError as exc:
        return str(exc)
    # What the source marks as abnormal is a real anomaly, whatever the entry's role.
    role = "real_anomaly" if item.finding else e["role"]
    tissue = None
    if role == "normal":
        atlas_sq = square(item.atlas, size) if item.atlas is not None else None
        spec = e["tissue"]
        tissue = tissue_mask(
            img, spec["method"], atlas_sq, spec.get("level", 0.15), spec.get("exclude_above")
        )
    return BaseImage(
        base_id=base_id,
        entry_id=e["id"],
        role=role,
        modality=e["modality"],
        sequence=e.get("sequence", "") or "",
        anatomy=e["anatomy"],
        licence=e["licence"],
        source=f"{e.get('package') or 'local'}:{e.get('path') or e.get('dataset')}",
        image=img,
        tissue=tissue,
        finding=item.finding or (e.get("finding", "") or ""),
        header=item.header,
        lesion=(
            square((_crop(item.lesion, e) > 0).astype(np.float32), size, order=0) > 0.5
            if item.lesion is not None
            else None
        ),
    )


# --- image codec: PNG bytes are what the tables store ----------------------------------


def encode_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def header_json(header: dict[str, Any]) -> str:
    return json.dumps(header, sort_keys=True)


BASE_SCHEMA = {
    "record_id": pl.Utf8(),
    "parent_ids": pl.List(pl.Utf8),
    "base_id": pl.Utf8(),
    "entry_id": pl.Utf8(),
    "subject_id": pl.Utf8(),
    "role": pl.Utf8(),
    "modality": pl.Utf8(),
    "sequence": pl.Utf8(),
    "anatomy": pl.Utf8(),
    "finding": pl.Utf8(),
    "licence": pl.Utf8(),
    "source": pl.Utf8(),
    "dicom_header": pl.Utf8(),  # de-identified, JSON
    "image_png": pl.Binary(),
    "tissue_png": pl.Binary(),
    "lesion_png": pl.Binary(),  # null unless the source gave a lesion mask
}


def bases_frame(bases: list[BaseImage]) -> pl.DataFrame:
    rows = [
        {
            "record_id": b.base_id,
            "parent_ids": [b.entry_id],
            "base_id": b.base_id,
            "entry_id": b.entry_id,
            "subject_id": b.subject_id,
            "role": b.role,
            "modality": b.modality,
            "sequence": b.sequence,
            "anatomy": b.anatomy,
            "finding": b.finding,
            "licence": b.licence,
            "source": b.source,
            "dicom_header": header_json(b.header),
            "image_png": encode_png(b.image),
            "tissue_png": encode_png(
                (b.tissue if b.tissue is not None else np.zeros(b.image.shape[:2], bool)).astype(
                    np.uint8
                )
            ),
            "lesion_png": encode_png(b.lesion.astype(np.uint8)) if b.lesion is not None else None,
        }
        for b in bases
    ]
    return pl.DataFrame(rows, schema=BASE_SCHEMA)


def bases_from_frame(df: pl.DataFrame) -> list[BaseImage]:
    out = []
    for r in df.to_dicts():
        out.append(
            BaseImage(
                base_id=r["base_id"],
                entry_id=r["entry_id"],
                role=r["role"],
                modality=r["modality"],
                sequence=r["sequence"],
                anatomy=r["anatomy"],
                licence=r["licence"],
                source=r["source"],
                image=decode_png(r["image_png"]).astype(np.float32) / 255.0,
                tissue=decode_png(r["tissue_png"]).astype(bool) if r["role"] == "normal" else None,
                finding=r["finding"],
                header=json.loads(r["dicom_header"]),
                lesion=decode_png(r["lesion_png"]).astype(bool) if r["lesion_png"] else None,
            )
        )
    return out
