"""The demo's own logic, without running a family: what its summary prints about rows, and
that a family name it does not know is refused before anything starts."""

import pytest

from pipelines import demo
from pipelines.runner import _fan_out


def test_the_summary_notes_rows_made_per_row_in_and_counts_review_rows_as_used():
    # MedAD's VQA: 37 cases, none rejected, 171 questions
    assert _fan_out({"rows_in": 37, "kept": 171, "rejected": 0}) == "  (4.6 rows out per row in)"
    # 14 slices from 12 files, 0 rejected
    assert _fan_out({"rows_in": 12, "kept": 14, "rejected": 0}) == "  (1.2 rows out per row in)"
    # TRACE triage: one pair held for review is not a row made from nothing
    assert _fan_out({"rows_in": 11, "kept": 10, "rejected": 0, "review": 1}) == ""
    assert _fan_out({"rows_in": 40, "kept": 37, "rejected": 3}) == ""
    assert _fan_out({"rows_in": 2, "kept": 0, "rejected": 2}) == ""


def test_an_unknown_family_is_named_before_anything_starts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--families", "trace,nope", "--home", str(tmp_path)])
    assert "unknown families ['nope']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no instance, no home written
