"""MedAD: the allow-list and its loaders (wheels, a local folder, a local HF dataset),
DICOM de-identification and the PHI scan, lesions that sit where the mask says and are
rejected when the center hides them, the verifier catching tampering, the rewards, the
LLM paraphrase with its claims re-verified, and the job end to end (SFT + GRPO + eval)."""

import io
import json
import math

import numpy as np
import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance
from scipy import ndimage as ndi

from pipelines.definitions import build_definitions
from quality.medad import answer_problems, balance_report, phi_hits, subject_leaks
from synth.llm import EmbeddedBackend, LLMClient, OpenAICompatBackend
from synth.medad.bases import (
    PHI_TAGS,
    AllowListError,
    bases_frame,
    decode_png,
    deidentify,
    encode_png,
    load_allowlist,
    load_bases,
    luminance,
    package_file,
    phi_values,
    read_dicom_phi,
)
from synth.medad.cases import (
    CELLS,
    DIRECTION,
    CaseSettings,
    build_cases,
    center_names,
    center_profiles,
    lesion_cnr,
)
from synth.medad.vqa import (
    COUNT_WORDS,
    LETTERS,
    build_items,
    claim_problems,
    completion,
    make_options,
    parse_claims,
    parse_completion,
    prompt_text,
)
from train.medad_rewards import rewards
from train.random_models import random_idefics3

from conftest import decode_png as decode_plot
from faulty_server import FaultyOpenAIServer

# Files the issue rules out as normal bases: pathology, overlays, bit-depth test patterns.
NOT_NORMAL = ("RG1_", "RG3_", "693_", "J2K_pixelrep_mismatch", "WithOverlays", "microaneurysms")


@pytest.fixture(scope="module")
def entries():
    return load_allowlist()


@pytest.fixture(scope="module")
def small(entries):
    """Bases, cases and items for five normal bases (two MRI subjects, so that one is held
    out for evaluation; CT, ultrasound, fundus) and a real anomaly, at 96 px."""
    keep = {"dipy_t1_coronal", "nibabel_epi", "pydicom_ct_small", "pydicom_us_aloka"}
    keep |= {"skimage_retina"}
    keep |= {"pydicom_tibia_fibroma"}
    bases, failures = load_bases([e for e in entries if e["id"] in keep], 96)
    assert not failures
    s = CaseSettings(image_size=96, centers=3, cases_per_base=2)
    cases, rejected, n = build_cases(bases, s)
    items, item_rejects, _ = build_items(cases, s.seed)
    return bases, s, cases, rejected, n, items, item_rejects


def test_allowlist_is_reviewed_and_a_bad_entry_is_named(entries, tmp_path):
    normal = [e for e in entries if e["role"] == "normal"]
    assert {e["modality"] for e in normal} >= {
        "MRI",
        "CT",
        "ultrasound",
        "fundus photography",
        "histopathology",
    }
    assert not [e["path"] for e in normal if any(bad in e["path"] for bad in NOT_NORMAL)]
    real = [e for e in entries if e["role"] == "real_anomaly"]
    assert len(real) >= 2 and all(e["finding"] for e in real)
    assert all(e["licence"] and package_file(e).exists() for e in entries)

    bad = tmp_path / "bases.yaml"
    bad.write_text(
        "bases:\n  - {id: x, role: normal, loader: npy, modality: MRI, anatomy: brain}\n"
    )
    with pytest.raises(AllowListError, match=r"x\.licence: missing"):
        load_allowlist(bad)
    bad.write_text(
        "bases:\n  - {id: y, role: normal, loader: zip, modality: MRI, anatomy: brain, licence: MIT}\n"
    )
    with pytest.raises(AllowListError, match=r"y\.loader: 'zip' is not one of"):
        load_allowlist(bad)


def test_dicom_headers_are_deidentified(entries, tmp_path):
    import pydicom

    dicom = [e for e in entries if e["loader"] == "dicom"]
    bases, _ = load_bases(dicom, 64)
    assert len(bases) == len(dicom)
    for e, b in zip(dicom, bases, strict=True):
        ds = pydicom.dcmread(package_file(e), stop_before_pixels=True)
        identifying = phi_values(ds)
        assert not set(b.header) & set(PHI_TAGS)
        text = json.dumps(b.header)
        assert not [v for v in identifying if v in text], b.base_id
        if "SOPInstanceUID" in b.header:  # replaced, not copied
            assert b.header["SOPInstanceUID"] != str(ds.SOPInstanceUID)
    # The shipped files do carry identifiers, so the scan has something to find.
    phi = read_dicom_phi(dicom)
    assert {"CompressedSamples^CT1", "1CT1", "5MR2"} <= phi  # short ids with letters too
    assert "7" not in phi  # a bare accession "7" would match every "7%" in the questions
    liver = next(e for e in dicom if e["id"] == "pydicom_liver_lesion")
    ds = pydicom.dcmread(package_file(liver), stop_before_pixels=True)
    header = deidentify(ds, salt="one")
    assert not {"PatientWeight", "PatientSize", "PregnancyStatus"} & set(header)
    assert header["StorageMediaFileSetUID"] != str(ds.StorageMediaFileSetUID)  # scanner serial
    # UIDs are salted: stable under one salt, unlinkable across salts.
    assert deidentify(ds, salt="one")["SOPInstanceUID"] == header["SOPInstanceUID"]
    assert deidentify(ds, salt="two")["SOPInstanceUID"] != header["SOPInstanceUID"]
    # A folder source is scanned as well: its DICOM files' identifiers join the list.
    import shutil

    ct = next(e for e in dicom if e["id"] == "pydicom_ct_small")
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(package_file(ct), folder / "scan.dcm")
    local = [{**ct, "id": "site", "loader": "folder", "path": str(folder), "package": None}]
    assert "CompressedSamples^CT1" in read_dicom_phi(local)


def test_folder_and_huggingface_loaders_read_local_copies(tmp_path):
    from PIL import Image

    folder = tmp_path / "isic_like"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png"
        )
    (folder / "notes.txt").write_text("not an image")
    spec = {
        "role": "normal",
        "modality": "dermoscopy",
        "anatomy": "skin",
        "licence": "test",
        "tissue": {"method": "fov"},
    }
    bases, failures = load_bases(
        [{**spec, "id": "local", "loader": "folder", "path": str(folder)}], 32
    )
    assert not failures and [b.base_id for b in bases] == ["local-img0", "local-img1", "local-img2"]
    assert bases[0].image.shape == (32, 32, 3) and bases[0].image.max() <= 1.0
    # A local copy of a Hugging Face image dataset (an imagefolder), through load_dataset.
    bases, failures = load_bases(
        [{**spec, "id": "hf", "loader": "hf", "dataset": str(folder), "limit": 2}], 32
    )
    assert not failures and len(bases) == 2
    # With a label column: a label outside `normal_labels` is a real finding.
    (folder / "metadata.csv").write_text(
        "file_name,dx\nimg0.png,nevus\nimg1.png,melanoma\nimg2.png,nevus\n"
    )
    labelled = {**spec, "id": "hf", "loader": "hf", "dataset": str(folder)}
    labelled |= {"label_column": "dx", "normal_labels": ["nevus"]}
    bases, failures = load_bases([labelled], 32)
    assert not failures
    assert [(b.role, b.finding) for b in bases] == [
        ("normal", ""),
        ("real_anomaly", "melanoma"),
        ("normal", ""),
    ]
    bases, failures = load_bases(
        [{**spec, "id": "gone", "loader": "folder", "path": str(tmp_path / "nope")}], 32
    )
    assert not bases and failures[0][1] == "load_failed" and "gone.path" in failures[0][2]


def _blob(shape, centre, radius):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius, strict=True)) <= 1


def test_brats_and_isic_layouts_load_masks_findings_and_fail_per_file(tmp_path):
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    # BraTS-style: a T1c volume and its segmentation per subject.
    brats = tmp_path / "brats"
    brats.mkdir()
    head = _blob((40, 40, 10), (20, 20, 5), (16, 14, 8)).astype(np.float32)
    for n, tumour in (("00001", True), ("00002", False)):
        vol = head * 100 + rng.normal(0, 3, head.shape).astype(np.float32)
        seg = np.zeros(head.shape, np.uint8)
        if tumour:  # slices 3-6 only
            seg[_blob(head.shape, (14, 24, 4.5), (4, 4, 1.6))] = 1
        nib.save(nib.Nifti1Image(vol, np.eye(4)), brats / f"BraTS-GLI-{n}-000-t1c.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), brats / f"BraTS-GLI-{n}-000-seg.nii.gz")
    (brats / "BraTS-GLI-00003-000-t1c.nii.gz").write_bytes(b"not a volume")
    entry = {
        "id": "brats",
        "role": "normal",
        "loader": "folder",
        "path": str(brats),
        "glob": "*-t1c.nii.gz",
        "mask": {"from": "-t1c", "to": "-seg"},
        "mask_finding": "glioma (segmented)",
        "slices": {"axis": 2, "at": [0.0, 0.5, 1.0]},
        "modality": "MRI",
        "sequence": "T1-weighted, contrast-enhanced",
        "anatomy": "brain",
        "licence": "test",
        "tissue": {"method": "otsu"},
    }
    bases, failures = load_bases([entry], 48)
    by_id = {b.base_id: b for b in bases}
    tumour = by_id["brats-BraTS-GLI-00001-000-t1c-z4"]
    assert tumour.role == "real_anomaly" and tumour.finding == "glioma (segmented)"
    assert tumour.lesion is not None and tumour.lesion.shape == (48, 48) and tumour.lesion.any()
    healthy = [b for b in bases if "00002" in b.base_id]
    assert [b.role for b in healthy] == ["normal"] * 3 and all(b.lesion is None for b in healthy)
    assert {b.subject_id for b in healthy} == {"brats-BraTS-GLI-00002-000-t1c"}
    # The tumour volume's other slices are never normal bases; the broken file fails alone.
    reasons = {what: reason for _, reason, _, what in failures}
    assert reasons == {
        "brats-BraTS-GLI-00001-000-t1c-z0": "anomalous_subject",
        "brats-BraTS-GLI-00001-000-t1c-z9": "anomalous_subject",
        "brats-BraTS-GLI-00003-000-t1c": "unreadable_file",
    }
    # Cases: the real lesion keeps its source mask, and the verifier reads it.
    s = CaseSettings(image_size=48, centers=2, cases_per_base=1, heldout_centers=1)
    cases, _, _ = build_cases(bases, s)
    real = cases.filter(pl.col("base_id") == tumour.base_id).row(0, named=True)
    assert real["split"] == "real_anomaly" and real["lesion_count"] == 1
    assert (decode_png(real["mask_png"]) > 0).sum() == tumour.lesion.sum()
    items, _, _ = build_items(cases, 0)
    assert answer_problems(items, cases, bases_frame(bases)) == []

    # ISIC-style: images, lesion masks beside them, a CSV of diagnoses.
    isic = tmp_path / "isic"
    isic.mkdir()
    skin = (rng.uniform(0.55, 0.75, (40, 40, 3)) * 255).astype(np.uint8)
    for n in ("0000001", "0000002", "0000003"):
        Image.fromarray(skin).save(isic / f"ISIC_{n}.jpg")
    mole = (_blob((40, 40), (20, 18), (8, 6)) * 255).astype(np.uint8)
    Image.fromarray(mole).save(isic / "ISIC_0000001_segmentation.png")
    (isic / "ISIC_0000004.jpg").write_bytes(b"\xff\xd8 truncated")
    (isic / "labels.csv").write_text(
        "image,finding\nISIC_0000001.jpg,nevus\nISIC_0000002.jpg,melanoma\nISIC_0000003.jpg,\n"
    )
    entry = {
        "id": "isic",
        "role": "normal",
        "loader": "folder",
        "path": str(isic),
        "glob": "*.jpg",
        "mask": {"from": ".jpg", "to": "_segmentation.png"},
        "findings": str(isic / "labels.csv"),
        "modality": "dermoscopy",
        "anatomy": "skin",
        "licence": "test",
        "tissue": {"method": "fov"},
    }
    bases, failures = load_bases([entry], 32)
    roles = {b.base_id: (b.role, b.finding, b.lesion is not None) for b in bases}
    assert roles == {
        "isic-ISIC_0000001": ("real_anomaly", "nevus", True),
        "isic-ISIC_0000002": ("real_anomaly", "melanoma", False),
        "isic-ISIC_0000003": ("normal", "", False),
    }
    assert [(w, r) for _, r, _, w in failures] == [("isic-ISIC_0000004", "unreadable_file")]
    assert "ISIC_0000004.jpg" in failures[0][2]
    # A findings table without its columns is named.
    (isic / "bad.csv").write_text("file,dx\nISIC_0000001.jpg,nevus\n")
    _, failures = load_bases([{**entry, "findings": str(isic / "bad.csv")}], 32)
    assert (
        failures[0][1] == "load_failed" and "isic.findings: no column 'finding'" in failures[0][2]
    )


def test_lesions_sit_where_the_mask_says_and_hidden_ones_are_rejected(small):
    bases, s, cases, rejected, n, _, _ = small
    assert cases.height + rejected.height == n
    assert set(cases["plan_index"]) | set(rejected["source_index"]) == set(range(n))
    abnormal = cases.filter(pl.col("abnormal") & (pl.col("split") != "real_anomaly"))
    assert abnormal.height and cases.filter(~pl.col("abnormal")).height
    for r in abnormal.to_dicts():
        img, mask = decode_png(r["image_png"]).astype(np.float32), decode_png(r["mask_png"])
        lum = luminance(img)
        assert r["lesion_count"] == len(np.unique(mask)) - 1 >= 1
        for lesion in r["lesions"]:
            inside = lum[mask == lesion["label"]].mean()
            tissue = decode_png(r["tissue_png"]).astype(bool) & (mask == 0)
            outside = lum[tissue].mean()
            # The finding's direction of contrast holds against the surrounding tissue.
            assert (inside < outside) == (DIRECTION[r["finding"]] == "dark"), r["record_id"]
            assert lesion["cnr"] >= s.min_cnr
    assert balance_report(cases, s.abnormal_rate)["passed"]
    # Above what any spot can show, no lesion is drawn at all: the case says why.
    unseen, dropped, m = build_cases(
        bases, CaseSettings(image_size=96, centers=2, cases_per_base=2, min_cnr=50.0)
    )
    assert unseen.height + dropped.height == m
    assert set(dropped["reason"]) == {"no_room_for_lesion"}
    assert not unseen.filter(pl.col("lesion_count") > 0).height
    assert all("where they show" in d and "min_cnr 50.0" in d for d in dropped["detail"])
    # A center so noisy that lesions drawn where they showed are hidden again afterwards.
    noisy = CaseSettings(image_size=96, centers=2, cases_per_base=2, shift_severity=6.0)
    hidden, dropped, m = build_cases(bases, noisy)
    assert hidden.height + dropped.height == m
    faint = dropped.filter(pl.col("reason") == "lesion_not_visible")
    assert faint.height and all("< min_cnr 2.5" in d for d in faint["detail"])


def test_ct_lesions_land_in_soft_tissue_not_in_bone(small):
    bases, _, cases, _, _, _, _ = small
    ct = next(b for b in bases if b.base_id == "pydicom_ct_small")
    # The vertebra and the aorta on this window (bases.yaml), read on the smoothed image.
    bone = ndi.gaussian_filter(ct.image, 1.0) > 0.62
    assert bone.sum() > 200 and not (ct.tissue & bone).any()
    drawn = cases.filter((pl.col("base_id") == ct.base_id) & (pl.col("lesion_count") > 0))
    assert drawn.height
    for r in drawn.to_dicts():
        assert not (bone & (decode_png(r["mask_png"]) > 0)).any(), r["record_id"]


def test_lesion_contrast_is_read_against_its_ring_in_grey_and_in_colour():
    rng = np.random.default_rng(0)
    side = 64
    yy, xx = np.mgrid[0:side, 0:side]
    lesion = (yy - 32) ** 2 + (xx - 32) ** 2 <= 36
    tissue = np.ones((side, side), bool)
    none = np.zeros((side, side), bool)
    # Grey: a checkerboard of 0.45 / 0.55 (mean 0.5, deviation 0.05) around a flat lesion
    # of 0.75: CNR 0.25 / (0.05 + the 0.001 guard) = 4.90.
    checker = np.where((yy + xx) % 2, 0.55, 0.45)
    grey = np.where(lesion, 0.75, checker)
    assert lesion_cnr(grey, lesion, tissue, none) == pytest.approx(0.25 / 0.051, rel=0.02)
    # Colour: a purple lesion on brown of the same luminance. Luminance alone sees
    # nothing; CIELAB sees the hue.
    brown = np.array([0.6, 0.4, 0.2])
    purple = np.array([0.56, 0.35, 0.55])
    pair = np.array([[brown, purple]], np.float32)
    assert abs(float(np.diff(luminance(pair)[0])[0])) < 0.005
    rgb = brown + rng.normal(0, 0.01, (side, side, 3))
    rgb[lesion] = purple + rng.normal(0, 0.01, (int(lesion.sum()), 3))
    lum = luminance(rgb.astype(np.float32))
    assert lesion_cnr(lum, lesion, tissue, none) < 1.0
    assert lesion_cnr(rgb, lesion, tissue, none) > 10.0


def test_centers_are_seeded_and_the_heldout_one_shifts_more():
    a, b = center_profiles(CaseSettings(seed=3)), center_profiles(CaseSettings(seed=3))
    assert a == b and a != center_profiles(CaseSettings(seed=4))
    assert [c.heldout for c in a] == [False, False, False, True]
    assert a[-1].severity == 1.5 and a[0].severity == 1.0
    with pytest.raises(ValueError, match="heldout_centers=4 must be"):
        center_profiles(CaseSettings(centers=4, heldout_centers=4))


def test_verifier_catches_tampered_answers_masks_and_reasoning(small):
    bases, _, cases, _, _, items, item_rejects = small
    base_table = bases_frame(bases)
    assert item_rejects.height == 0
    assert answer_problems(items, cases, base_table) == []
    types = set(items["question_type"])
    assert types == {
        "modality",
        "anatomy",
        "presence",
        "location",
        "count",
        "size",
        "characterisation",
    }

    # A wrong letter.
    i = items["question_type"].to_list().index("count")
    wrong = LETTERS[(LETTERS.index(items["answer"][i]) + 1) % len(items["options"][i])]
    tampered = items.with_columns(
        answer=pl.when(pl.int_range(pl.len()) == i).then(pl.lit(wrong)).otherwise(pl.col("answer"))
    )
    problems = answer_problems(tampered, cases, base_table)
    assert len(problems) == 1 and problems[0].startswith(
        f"item {items['record_id'][i]} (count): answer"
    )
    # Reasoning that claims another count than the mask holds.
    think, letter = parse_completion(items["completion"][i])
    facts = json.loads(items["facts_json"][i])
    words = ("one", "two", "three", "four")
    lie = think.replace(words[facts["count"] - 1], words[facts["count"] % 4], 1)
    bad_cot = items.with_columns(
        completion=pl.when(pl.int_range(pl.len()) == i)
        .then(pl.lit(completion(lie, letter)))
        .otherwise(pl.col("completion"))
    )
    assert any("completion" in p for p in answer_problems(bad_cot, cases, base_table))
    # A mask edited after the items were made: the facts no longer match.
    case_id = items["case_id"][i]
    blank = encode_png(np.zeros((96, 96), np.uint8))
    edited = cases.with_columns(
        mask_png=pl.when(pl.col("record_id") == case_id)
        .then(pl.lit(blank))
        .otherwise(pl.col("mask_png"))
    )
    broken = answer_problems(items, edited, base_table)
    assert broken and all(case_id in "".join(broken) or "item" in p for p in broken)
    assert len(broken) >= items.filter(pl.col("case_id") == case_id).height


def test_phi_scan_finds_an_identifier_in_text_and_in_image_bytes(small):
    _, _, cases, _, _, items, _ = small
    phi = {"CompressedSamples^CT1", "19450312"}
    assert phi_hits({"medad_vqa": items, "medad_cases": cases}, phi) == []
    leaked = items.with_columns(question=pl.lit("patient compressedsamples^ct1: what is this?"))
    assert len(phi_hits({"medad_vqa": leaked}, phi)) == items.height
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "PatientBirthDate 19450312")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG", pnginfo=info)
    burned = cases.head(1).with_columns(image_png=pl.lit(buf.getvalue()))
    hits = phi_hits({"medad_cases": burned}, phi)
    assert hits == ["medad_cases.image_png[0]: '19450312'"]


def test_phi_scan_of_dagster_metadata_finds_text_and_skips_inlined_images():
    from assets.medad import _as_text

    phi = {"1CT1", "CompressedSamples^CT1"}
    # base64 of a plot can hold "1ct1" by chance; the text beside it is what is read.
    plot = "![sheet](data:image/png;base64,AAAA1ct1BBBB==)"
    rows = pl.DataFrame(
        {
            "entry": ["medad_bases.preview", "medad_bases.sheet", "medad_vqa.settings"],
            "value": [
                _as_text("| base | note |\n| x | patient 1CT1 |"),
                _as_text(plot),
                _as_text({"allowlist": "", "seed": 0}),
            ],
        }
    )
    assert phi_hits({"dagster_metadata": rows}, phi) == ["dagster_metadata.value[0]: '1ct1'"]


def test_rewards_separate_right_wrong_malformed_and_inconsistent(small):
    items = small[5]
    row = items.filter(pl.col("question_type") == "count").row(0, named=True)
    item = {**row, "facts": json.loads(row["facts_json"])}
    right = rewards(row["completion"], item)
    assert right == {
        "format": 1.0,
        "accuracy": 1.0,
        "consistency": 1.0,
        "total": pytest.approx(1.0),
    }
    think, letter = parse_completion(row["completion"])
    other = next(c for c in LETTERS[: len(row["options"])] if c != letter)
    wrong = rewards(completion(think, other), item)
    assert wrong["accuracy"] == 0.0 and wrong["consistency"] == 0.0 and wrong["format"] == 1.0
    assert rewards(f"{think} so {letter}", item) == {
        "format": 0.0,
        "accuracy": 0.0,
        "consistency": 0.0,
        "total": 0.0,
    }
    # Saying nothing checkable earns no consistency; being right about the image but
    # silent on the question earns a quarter; a grounded argument earns it all.
    empty = rewards(completion("Looking carefully at the image.", letter), item)
    assert empty["consistency"] == 0.0 and empty["total"] == pytest.approx(0.8)
    facts = item["facts"]
    aside = f"This is an {facts['modality']} image of the {facts['anatomy']}."
    silent = rewards(completion(aside, letter), item)
    assert silent["consistency"] == 0.25 and silent["total"] == pytest.approx(0.85)
    wrong_region = rewards(completion(aside.replace(facts["anatomy"], "knee"), letter), item)
    assert wrong_region["consistency"] == 0.0
    both = rewards(completion(think + " I see no focal lesion.", letter), item)
    assert both["consistency"] == 0.0
    assert parse_claims(think + " I see no focal lesion.")["abnormal"] == [False, True]


def test_consistency_credits_each_lesion_and_reads_whole_terms(small):
    items = small[5]
    rows = items.filter(pl.col("question_type") == "count").to_dicts()
    row = next(r for r in rows if json.loads(r["facts_json"])["count"] >= 2)
    facts = json.loads(row["facts_json"])
    item = {**row, "facts": facts}
    letter = row["answer"]
    # Describing each lesion's place is consistent; a place no lesion has is not.
    each = " ".join(f"A lesion lies in the {c} region." for c in facts["cells"])
    said = f"I count {COUNT_WORDS[facts['count']]} focal lesions. {each}"
    assert rewards(completion(said, letter), item)["consistency"] == 1.0
    elsewhere = next(c for c in CELLS if c not in facts["cells"])
    assert (
        rewards(completion(f"{said} One lies in the {elsewhere} region.", letter), item)[
            "consistency"
        ]
        == 0.0
    )
    # Whole terms: "CE-MRI" is not "MRI", "PET/CT" is one claim, "liver" is a claim.
    assert parse_claims("A CE-MRI of the liver.")["modality"] == ["CE-MRI"]
    assert parse_claims("A CE-MRI of the liver.")["anatomy"] == ["liver"]
    assert parse_claims("PET/CT of the chest")["modality"] == ["PET/CT"]
    assert parse_claims("An MRI image")["modality"] == ["MRI"]
    # A region inside the one the image shows is not a contradiction; another region is.
    abdomen = {"modality": "MRI", "anatomy": "abdomen", "abnormal": True, "count": None}
    assert claim_problems(parse_claims("MRI of the abdomen: a liver lesion"), abdomen) == []
    assert claim_problems(parse_claims("MRI of the brain"), abdomen)
    rng = np.random.default_rng(0)
    for _ in range(20):  # no option a reader could also call right
        opts = make_options("modality", {"modality": "MRI"}, rng)
        assert "CE-MRI" not in opts and opts.count("MRI") == 1
        assert "liver" not in make_options("anatomy", {"anatomy": "abdomen"}, rng)


def test_splits_are_by_subject_and_the_gate_fails_on_a_shared_one(small):
    from assets.medad import training_gate

    bases, _, cases, _, _, items, _ = small
    table = bases_frame(bases)
    assert set(table.filter(pl.col("entry_id") == "nibabel_epi")["subject_id"]) == {"nibabel_epi"}
    held = set(cases.filter(pl.col("split").is_in(["test", "heldout_center"]))["subject_id"])
    assert len(held) == 1 and not held & set(cases.filter(pl.col("split") == "train")["subject_id"])
    assert subject_leaks(items, table) == {}
    ok = training_gate(items, table)
    assert ok.passed and ok.metadata["subjects_in_train_and_eval"].value == 0
    # One evaluation image filed under train: its subject is on both sides.
    i = items["split"].to_list().index("test")
    shared = items.with_columns(
        split=pl.when(pl.int_range(pl.len()) == i).then(pl.lit("train")).otherwise("split")
    )
    (subject,) = held
    assert list(subject_leaks(shared, table)) == [subject]
    failed = training_gate(shared, table)
    assert not failed.passed and failed.metadata["subjects_in_train_and_eval"].value == 1
    # A volume's slices are one subject: a slice in train and another in test leak.
    slices = pl.DataFrame({"base_id": ["vol-z3", "vol-z5"], "subject_id": ["vol", "vol"]})
    two = pl.DataFrame({"base_id": ["vol-z3", "vol-z5"], "split": ["train", "test"]})
    assert subject_leaks(two, slices) == {"vol": ["test"]}


def test_the_verifier_reads_the_mask_itself_and_catches_a_generator_mistake(small):
    bases, _, cases, _, _, items, _ = small
    table = bases_frame(bases)
    assert answer_problems(items, cases, table) == []
    # A generator that mislabels sizes: answer, facts and reasoning all agree with each
    # other, only the mask disagrees. Re-running the generator's own facts would pass it.
    i = items["question_type"].to_list().index("size")
    row = items.row(i, named=True)
    facts = json.loads(row["facts_json"])
    other = next(o for o in row["options"] if o != facts["size"])
    think, _ = parse_completion(row["completion"])
    bad = {
        "answer": LETTERS[row["options"].index(other)],
        "facts_json": json.dumps({**facts, "size": other, "sizes": [other]}, sort_keys=True),
        "completion": completion(
            think.replace(f"is {facts['size']}", f"is {other}"),
            LETTERS[row["options"].index(other)],
        ),
    }
    mislabelled = items.with_columns(
        **{
            k: pl.when(pl.int_range(pl.len()) == i).then(pl.lit(v)).otherwise(k)
            for k, v in bad.items()
        }
    )
    problems = answer_problems(mislabelled, cases, table)
    assert [p.split(": ")[1] for p in problems] == ["facts_json", "answer"]
    assert f"the mask and base read {facts['size']!r}" in problems[0]
    # The allow-list's region is the truth: the CT slice is chest, so "abdomen" is wrong.
    ct = items.filter(
        (pl.col("base_id") == "pydicom_ct_small") & (pl.col("question_type") == "anatomy")
    )
    assert json.loads(ct["facts_json"][0])["anatomy"] == "chest"


def test_grpo_loss_clips_the_ratio_and_adds_the_kl_on_hand_computed_values():
    import torch

    from train.medad import group_advantages, grpo_loss

    adv = group_advantages(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    # Row 1: mean 0.5, sample std 0.7071 -> +-0.7070; row 2: all equal -> 0.
    assert torch.allclose(adv, torch.tensor([[0.7070, -0.7070], [0.0, 0.0]]), atol=1e-3)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    old = torch.zeros(2, 2)
    # On-policy (ratio 1): the loss is -mean(A); no KL without a reference.
    loss, kl = grpo_loss(old.clone(), old, None, mask, torch.tensor([1.0, -1.0]), 0.2, 0.1)
    assert loss.item() == pytest.approx(0.0) and kl == 0.0
    # Ratio 1.5: clipped at 1.2 for a positive advantage (-1.2), not for a negative one
    # (min(-1.5, -1.2) = -1.5, so +1.5); mean over the two completions 0.15.
    lp = torch.full((2, 2), math.log(1.5))
    loss, _ = grpo_loss(lp, old, None, mask, torch.tensor([1.0, -1.0]), 0.2, 0.0)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    # KL (k3) with the reference log 2 above the policy: 2 - log 2 - 1 = 0.3069 a token.
    ref = old + math.log(2.0)
    loss, kl = grpo_loss(old.clone(), old, ref, mask, torch.tensor([0.0, 0.0]), 0.2, 0.5)
    assert kl == pytest.approx(1 - math.log(2.0)) and loss.item() == pytest.approx(
        0.5 * (1 - math.log(2.0))
    )


def test_grpo_updates_raise_the_reward_the_policy_expects_and_the_sign_matters(small):
    """The stage's update (`grpo_update`, at the stage's default settings) on a fixed group
    per item: the right answer and the same reasoning with a wrong letter. The reward the
    policy expects over the group, each completion weighted by its probability, rises
    with every update; with the advantages negated it falls. (Sampled rewards on the CPU
    default are too noisy over a few steps to show the rise: docs/medad.md.)"""
    import torch

    from train.medad import build_model, group_advantages, grpo_update, parser

    _, _, cases, _, _, items, _ = small
    images = dict(zip(cases["record_id"], cases["image_png"], strict=True))
    rows = (
        items.filter(pl.col("split") == "train")
        .unique("question_type", keep="first", maintain_order=True)
        .head(2)
        .to_dicts()
    )
    texts, group = [], []
    for r in rows:
        r["facts"] = json.loads(r["facts_json"])
        think, letter = parse_completion(r["completion"])
        wrong = next(x for x in LETTERS[: len(r["options"])] if x != letter)
        texts += [r["completion"], completion(think, wrong)]
        group += [r, r]
    reward = torch.tensor([rewards(t, r)["total"] for t, r in zip(texts, group, strict=True)])
    reward = reward.view(len(rows), 2)
    assert (reward[:, 0] > reward[:, 1]).all()
    a = parser().parse_args(["--items", "-", "--cases", "-", "--output-dir", "-"])
    vlm = build_model("", 32, 2, 4, 8, 0)
    tok = vlm.tok
    gen = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    pngs = [images[r["case_id"]] for r in group]
    prompts = [prompt_text(r["question"], r["options"]) for r in group]

    def expected_reward() -> float:
        with torch.no_grad():
            sums, _ = vlm.completion_logprobs(pngs, prompts, gen)
        return float((torch.softmax(sums.view(len(rows), 2), 1) * reward).sum(1).mean())

    adv = group_advantages(reward).flatten()
    start = {n: p.detach().clone() for n, p in vlm.named_trainable().items()}
    for sign in (1.0, -1.0):
        for n, p in vlm.named_trainable().items():
            p.data.copy_(start[n])
        opt = torch.optim.AdamW(vlm.trainable(), lr=a.grpo_learning_rate)
        trace = [expected_reward()]
        for _ in range(2):
            grpo_update(vlm, opt, pngs, prompts, gen, sign * adv, None, a)
            trace.append(expected_reward())
        steps = np.diff(trace)
        assert (steps > 0).all() if sign > 0 else (steps < 0).all(), trace


def test_evaluation_samples_every_type_and_scores_the_baselines_by_hand():
    from collections import Counter

    from train.medad_eval import baseline_scores, sample_per_type

    rows = [
        {"split": s, "question_type": q, "i": i}
        for s in ("test", "real_anomaly")
        for q in ("presence", "modality")
        for i in range(3)
    ]
    picked = sample_per_type(rows, 2, seed=0)
    assert Counter((r["split"], r["question_type"]) for r in picked) == {
        k: 2 for k in {(r["split"], r["question_type"]) for r in rows}
    }
    assert sample_per_type(rows, 2, seed=0) == picked and sample_per_type(rows, 0, 0) == rows
    majority = {"modality": Counter({"MRI": 5, "CT": 2}), "presence": Counter({"no": 3})}
    mri = {"question_type": "modality", "options": ["CT", "MRI", "PET"], "answer_text": "CT"}
    assert baseline_scores(mri, majority) == {
        "chance": pytest.approx(1 / 3),
        "majority_correct": False,  # majority says MRI
        "always_yes_correct": None,
    }
    yes = {"question_type": "presence", "options": ["yes", "no"], "answer_text": "yes"}
    assert baseline_scores(yes, majority) == {
        "chance": 0.5,
        "majority_correct": False,
        "always_yes_correct": True,
    }
    unseen = {"question_type": "size", "options": ["large", "small"], "answer_text": "large"}
    assert baseline_scores(unseen, majority)["majority_correct"] is True  # ties: first listed


def test_paraphrase_is_kept_only_when_its_claims_survive(small):
    cases = small[2].filter(~pl.col("abnormal")).head(1)
    client = LLMClient(EmbeddedBackend())
    items, _, _ = build_items(cases, 0, client, paraphrase_rate=1.0)
    assert items.height == 3 and set(items["paraphrase"]) <= {
        "accepted",
        "rejected_claims_changed",
        "failed",
    }
    original, _, _ = build_items(cases, 0)
    for para, orig in zip(items.to_dicts(), original.to_dicts(), strict=True):
        claims = parse_claims(parse_completion(para["completion"])[0])
        assert claims == parse_claims(parse_completion(orig["completion"])[0])
        if para["paraphrase"] != "accepted":
            assert para["completion"] == orig["completion"]
    # A server that fails every call: the original reasoning stays, marked failed.
    with FaultyOpenAIServer("server_error") as server:
        faulty = LLMClient(OpenAICompatBackend(server.base_url, "faulty", max_retries=0))
        failed, _, _ = build_items(cases, 0, faulty, paraphrase_rate=1.0)
    assert set(failed["paraphrase"]) == {"failed"}
    assert failed["completion"].to_list() == original["completion"].to_list()


MEDAD = {"image_size": 96, "cases_per_base": 1, "paraphrase_rate": 0.03}
CENTERS = center_names(4)


def _materialize_centers(defs, instance, medad, centers=CENTERS):
    """What a backfill of `medad_centers` does: one run per center partition."""
    job = defs.resolve_job_def("medad_centers")
    config = {
        "ops": {
            "medad_base_assets": {"config": medad},
            "medad_center_case_assets": {"config": medad},
        }
    }
    for center in centers:
        assert job.execute_in_process(
            instance=instance, partition_key=center, run_config=config
        ).success


def _run_job(tmp_path, medad):
    defs, instance = build_definitions(tmp_path), DagsterInstance.ephemeral()
    _materialize_centers(defs, instance, medad)
    return defs.resolve_job_def("medad").execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={
            "ops": {
                "medad_model": {
                    "config": {
                        "sft_steps": 2,
                        "grpo_steps": 1,
                        "num_generations": 2,
                        "batch_size": 2,
                    }
                },
                "medad_eval": {"config": {"max_new_tokens": 24, "limit_per_type": 1}},
            }
        },
    )


def test_center_shards_merge_into_the_whole_and_a_missing_or_mismatched_one_is_named(
    tmp_path, entries
):
    bases, _ = load_bases(entries, 64)
    s = CaseSettings(image_size=64)
    whole, whole_rejected, n = build_cases(bases, s)
    shards = [build_cases(bases, s, centers={c}, real_anomalies=False) for c in CENTERS]
    real = build_cases(bases, s, centers=set(), real_anomalies=True)
    merged = pl.concat([k for k, _, _ in [*shards, real]]).sort("plan_index")
    assert merged.equals(whole.sort("plan_index"))
    assert sum(m for _, _, m in [*shards, real]) == n
    assert sum(r.height for _, r, _ in [*shards, real]) == whole_rejected.height

    defs, instance = build_definitions(tmp_path), DagsterInstance.ephemeral()
    small = {"image_size": 64, "cases_per_base": 1}
    _materialize_centers(defs, instance, small, CENTERS[:3])
    merge = defs.resolve_job_def("medad").execute_in_process(
        instance=instance,
        raise_on_error=False,
        asset_selection=[AssetKey("medad_cases"), AssetKey("medad_cases_rejected")],
    )
    assert not merge.success
    failure = next(e for e in merge.all_events if e.is_step_failure)
    assert "no materialization for center_3" in failure.step_failure_data.error.cause.message
    _materialize_centers(defs, instance, {**small, "seed": 1}, CENTERS[3:])
    merge = defs.resolve_job_def("medad").execute_in_process(
        instance=instance,
        raise_on_error=False,
        asset_selection=[AssetKey("medad_cases"), AssetKey("medad_cases_rejected")],
    )
    failure = next(e for e in merge.all_events if e.is_step_failure)
    assert "made with different settings" in failure.step_failure_data.error.cause.message
    # A center count that disagrees with the partitions is refused, naming both.
    wrong = defs.resolve_job_def("medad_centers").execute_in_process(
        instance=instance,
        partition_key="center_0",
        raise_on_error=False,
        run_config={"ops": {"medad_center_case_assets": {"config": {**small, "centers": 3}}}},
    )
    failure = next(e for e in wrong.all_events if e.is_step_failure)
    assert (
        "centers=3, but the medad_center_cases partitions are 4"
        in failure.step_failure_data.error.cause.message
    )


def test_failed_gate_stops_medad_training(tmp_path):
    # Every in-distribution case is a test case: nothing to train on.
    # Every subject held out for evaluation: nothing to train on.
    result = _run_job(tmp_path, {**MEDAD, "eval_subject_share": 1.0, "paraphrase_rate": 0.0})
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    gate = checks["medad_vqa_ready_for_training"]
    assert not gate.passed and gate.metadata["observed_train_items"].value == 0
    assert checks["medad_answers_verified"].passed and checks["medad_no_phi"].passed
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "medad_vqa" in materialized and not materialized & {"medad_model", "medad_eval"}


def test_medad_job_end_to_end(tmp_path):
    result = _run_job(tmp_path, MEDAD)
    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert {n for n, e in checks.items() if not e.passed} == set()
    assert result.success
    assert checks["medad_answers_verified"].metadata["verified_share"].value == 1.0
    assert checks["medad_no_phi"].metadata["identifying_values_scanned"].value > 10
    storage = tmp_path / "storage"
    bases = pl.read_parquet(storage / "medad_bases.parquet")
    assert bases.filter(pl.col("role") == "real_anomaly").height == 3
    cases = pl.read_parquet(storage / "medad_cases.parquet")
    dropped = pl.read_parquet(storage / "medad_cases_rejected.parquet")
    assert set(cases["split"]) == {"train", "test", "heldout_center", "real_anomaly"}
    # Splits by subject: a training subject at the three in-distribution centers, an
    # evaluation subject at all four and once as acquired (a real-slice negative).
    normal = bases.filter(pl.col("role") == "normal")
    held = set(cases.filter(pl.col("split").is_in(["test", "heldout_center"]))["subject_id"])
    assert held and not held & set(cases.filter(pl.col("split") == "train")["subject_id"])
    n_held = normal.filter(pl.col("subject_id").is_in(list(held))).height
    assert cases.height + dropped.height == 3 * normal.height + 2 * n_held + 3
    items = pl.read_parquet(storage / "medad_vqa.parquet")
    assert set(items["case_id"]) == set(cases["record_id"])
    assert set(items["paraphrase"]) - {"none"}  # some reasonings went to the LLM

    mats = {
        e.asset_key.path[-1]: e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    sheet = decode_plot(mats["medad_cases"]["contact_sheet"].value)
    assert sheet.width > 600 and sheet.height > 200
    model = mats["medad_model"]
    assert model["trainable_tensors_changed"].value == model["trainable_tensors"].value > 0
    assert math.isfinite(model["final_sft_loss"].value)
    grpo = model["history"].value["grpo"]
    assert len(grpo) == 1 and 0.0 <= grpo[0]["reward"] <= 1.0 and grpo[0]["completion_tokens"] > 0
    decode_plot(model["sft_loss_curve"].value)
    evaluation = pl.read_parquet(storage / "medad_eval.parquet")
    assert set(evaluation["split"]) == {"test", "heldout_center", "real_anomaly"}
    # One item per (split, question type): every type asked where it exists.
    cells = evaluation.group_by("split", "question_type").len()
    assert cells["len"].max() == 1 and cells.height == evaluation.height
    assert evaluation.filter(pl.col("split") == "test")["question_type"].n_unique() >= 5
    assert evaluation["generation"].str.len_chars().min() > 0
    presence = evaluation.filter(pl.col("question_type") == "presence")
    assert presence["always_yes_correct"].null_count() == 0
    assert (
        evaluation.filter(pl.col("question_type") != "presence")["always_yes_correct"].null_count()
        == evaluation.height - presence.height
    )
    real = items.filter(
        (pl.col("split") == "real_anomaly") & (pl.col("question_type") == "presence")
    )
    assert set(real["answer_text"]) == {"yes", "no"}  # the real slice has negatives
    md = mats["medad_eval"]
    assert 0.0 <= md["accuracy_heldout_center"].value <= 1.0
    assert 0.0 < md["chance_baseline"].value < 1.0 and "majority" in md["per_question_type"].value
    decode_plot(md["accuracy_by_split"].value)
    decode_plot(md["accuracy_vs_baselines"].value)


# A chat template that places the image token where an image part is (SmolLM2's own
# template only knows text parts).
def test_a_huggingface_vlm_from_a_local_path_trains_and_answers(small, tmp_path):
    from train import medad, medad_eval

    _, _, cases, _, _, items, _ = small
    items.write_parquet(tmp_path / "items.parquet")
    cases.write_parquet(tmp_path / "cases.parquet")
    random_idefics3(tmp_path / "vlm")
    assert medad.is_hf_vlm(str(tmp_path / "vlm")) and not medad.is_hf_vlm("")
    data = ["--items", str(tmp_path / "items.parquet"), "--cases", str(tmp_path / "cases.parquet")]
    result = medad.main(
        [
            *data,
            "--output-dir",
            str(tmp_path / "out"),
            "--model",
            str(tmp_path / "vlm"),
            "--sft-steps",
            "2",
            "--grpo-steps",
            "1",
            "--num-generations",
            "2",
            "--batch-size",
            "2",
            "--max-completion-length",
            "12",
        ]
    )
    assert math.isfinite(result["final_sft_loss"]) and result["trainable_tensors_changed"] > 0
    assert json.loads((tmp_path / "out" / "medad_vlm.json").read_text())["kind"] == "hf"
    evaluation = medad_eval.main(
        [
            "--model-dir",
            str(tmp_path / "out"),
            *data,
            "--out",
            str(tmp_path / "pred.parquet"),
            "--limit-per-type",
            "1",
            "--max-new-tokens",
            "6",
        ]
    )
    preds = pl.read_parquet(tmp_path / "pred.parquet")
    assert evaluation["items"] == preds.height
    assert preds.group_by("split", "question_type").len()["len"].max() == 1
    assert set(preds["split"]) == {
        "test",
        "heldout_center",
        "real_anomaly",
    }


def test_one_center_partition_materializes_from_the_dagster_cli(cli_env, tmp_path):
    import subprocess

    from conftest import materialize_cmd

    select = "medad_bases,medad_bases_rejected,medad_center_cases,medad_center_cases_rejected"
    cmd = materialize_cmd(select)
    done = subprocess.run(
        [*cmd, "--partition", "center_2"], env=cli_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shard = pl.read_parquet(tmp_path / "storage" / "medad_center_cases" / "center_2.parquet")
    assert shard.height and set(shard["center"]) == {"center_2"}
    assert not (tmp_path / "storage" / "medad_center_cases" / "center_0.parquet").exists()
