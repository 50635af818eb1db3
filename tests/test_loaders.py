"""Seed loaders on the real public files in ../shared/data and on bad input."""

import gzip
import json

import polars as pl
import pytest

from synth.loaders import (
    SHIPPED_SEEDS,
    SeedSourceError,
    load_instructions,
    load_personas,
    load_preference_pairs,
    parse_dialogue,
)


def test_hh_rlhf_real_pairs_are_parsed_or_rejected_with_reason(shared_data):
    r = load_preference_pairs(str(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"))
    assert r.n_in == 2312
    assert r.kept.height + r.rejected.height == 2312
    assert r.kept.height > 2200
    assert set(r.rejected["reason"]) <= {"unparseable_dialogue", "empty_field", "duplicate"}
    assert sorted(r.kept["source_index"].to_list() + r.rejected["source_index"].to_list()) == list(
        range(2312)
    )
    row = r.kept.row(0, named=True)
    assert row["source_format"] == "hh-rlhf"
    assert row["history"][-1]["role"] == "user" and row["prompt"] == row["history"][-1]["content"]
    assert row["chosen"] and row["rejected"] and row["chosen"] != row["rejected"]
    assert "Human:" not in row["chosen"] and "Assistant:" not in row["prompt"]
    # every rejection names the record
    assert all(" record " in d for d in r.rejected["detail"])


def test_self_instruct_and_persona_hub_real_files(shared_data):
    ins = load_instructions(str(shared_data / "self-instruct-seed-tasks.jsonl"))
    assert (ins.n_in, ins.kept.height, ins.rejected.height) == (175, 175, 0)
    first = ins.kept.row(0, named=True)
    assert first["source_id"] == "seed_task_0" and first["instruction"]
    assert ins.kept["is_classification"].sum() > 0
    per = load_personas(str(shared_data / "persona-hub-personas.jsonl"), limit=500)
    assert per.n_in == 500 and per.kept.height + per.rejected.height == 500


def test_shipped_seeds_load_cleanly():
    for loader, name in (
        (load_instructions, "instructions.jsonl"),
        (load_preference_pairs, "preference_pairs.jsonl"),
        (load_personas, "personas.jsonl"),
    ):
        r = loader(str(SHIPPED_SEEDS / name))
        assert r.n_in >= 10 and r.rejected.height == 0


def test_pku_saferlhf_format(tmp_path):
    rows = [
        {
            "prompt": "How do I store knives?",
            "response_0": "In a block.",
            "response_1": "Anywhere.",
            "safer_response_id": 0,
            "better_response_id": 0,
        },
        {
            "prompt": "Q2",
            "response_0": "a",
            "response_1": "b",
            "safer_response_id": 1,
            "better_response_id": 0,
        },
        {
            "prompt": "Q3",
            "response_0": "a",
            "response_1": "b",
            "safer_response_id": 7,
            "better_response_id": 0,
        },
    ]
    f = tmp_path / "pku.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    r = load_preference_pairs(str(f))
    assert r.kept["chosen"].to_list() == ["In a block.", "b"]
    assert r.kept["source_format"].unique().to_list() == ["pku-saferlhf"]
    (bad,) = r.rejected.to_dicts()
    assert (
        bad["reason"] == "invalid_value"
        and "safer_response_id" in bad["detail"]
        and "record 2" in bad["detail"]
    )


def test_dataset_saved_to_disk_loads_like_a_file(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"persona": "a sailor"}, {"persona": "a baker"}]).save_to_disk(
        str(tmp_path / "ds")
    )
    assert load_personas(str(tmp_path / "ds")).kept["persona"].to_list() == ["a sailor", "a baker"]


def test_bad_records_are_rejected_naming_record_and_field(tmp_path):
    f = tmp_path / "ins.jsonl"
    rows = [
        {"instruction": "Fine one."},
        {"name": "no instruction here", "instruction": None},
        {"instruction": "   "},
        {"instruction": 42},
        {"instruction": "Fine one."},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    r = load_instructions(str(f))
    assert r.kept.height == 1
    got = {d["source_index"]: (d["reason"], d["detail"]) for d in r.rejected.to_dicts()}
    assert got[1][0] == "missing_field" and "record 1: field 'instruction'" in got[1][1]
    assert got[2][0] == "empty_field"
    assert got[3][0] == "wrong_type" and "should be str, got int" in got[3][1]
    assert got[4][0] == "duplicate" and "record 0" in got[4][1]


def test_a_line_that_is_not_json_costs_only_itself(tmp_path):
    pairs = [
        json.dumps(
            {
                "prompt": f"q{i}",
                "response_0": f"a{i}",
                "response_1": f"b{i}",
                "safer_response_id": 0,
            }
        )
        for i in range(5)
    ]
    pairs[2] = '{"prompt": "q2", "response_0": "unterminated'
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(pairs) + "\n")
    r = load_preference_pairs(str(f))
    assert r.n_in == 5 and r.kept.height == 4 and r.rejected.height == 1
    (bad,) = r.rejected.to_dicts()
    assert bad["reason"] == "invalid_json" and f"{f}:3: invalid JSON" in bad["detail"]
    assert bad["source_index"] == 2
    # a file where no line parses still fails, naming the first bad line
    g = tmp_path / "broken.jsonl.gz"
    with gzip.open(g, "wt") as fh:
        fh.write("not json\nnor this\n")
    with pytest.raises(
        SeedSourceError, match=r"broken.jsonl.gz:1: invalid JSON .* no line of the file parses"
    ):
        load_personas(str(g))


def test_a_truncated_gzip_keeps_what_it_read_and_records_the_cut(tmp_path):
    lines = "".join(
        json.dumps({"persona": f"A nurse who keeps bees, number {i}, " + "x" * 200}) + "\n"
        for i in range(200)
    )
    whole = tmp_path / "whole.jsonl.gz"
    with gzip.open(whole, "wt") as fh:
        fh.write(lines)
    data = whole.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    r = load_personas(str(cut))
    (trunc,) = r.rejected.filter(pl.col("reason") == "truncated_file").to_dicts()
    assert "ends early" in trunc["detail"] and f"of {len(data) * 2 // 3}" in trunc["detail"]
    assert 0 < r.kept.height < 200 and r.n_in == r.kept.height + r.rejected.height
    assert r.kept["persona"].to_list() == [
        json.loads(x)["persona"] for x in lines.splitlines()[: r.kept.height]
    ]


def test_pairs_that_teach_nothing_and_texts_with_no_words_are_rejected(tmp_path):
    rows = [
        {
            "prompt": "q",
            "response_0": "Same answer.",
            "response_1": "Same  answer. ",
            "safer_response_id": 1,
        },
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello",
        },
        {"prompt": "q2", "response_0": "yes", "response_1": "no", "safer_response_id": 0},
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = load_preference_pairs(str(f))
    assert r.kept.height == 1 and r.rejected["reason"].to_list() == [
        "identical_pair",
        "identical_pair",
    ]
    assert "fields 'chosen' and 'rejected' are the same response" in r.rejected["detail"][0]
    ins = tmp_path / "ins.jsonl"
    ins.write_text(
        "".join(json.dumps({"instruction": t}) + "\n" for t in ("<p> </p>", "***", "Name a bird."))
    )
    i = load_instructions(str(ins))
    assert i.kept["instruction"].to_list() == ["Name a bird."]
    assert i.rejected["reason"].to_list() == ["no_content", "no_content"]
    assert "field 'instruction' has no words" in i.rejected["detail"][0]
    per = tmp_path / "personas.jsonl"
    per.write_text(
        json.dumps({"persona": "---"}) + "\n" + json.dumps({"persona": "A baker."}) + "\n"
    )
    p = load_personas(str(per))
    assert p.kept.height == 1 and p.rejected["reason"].to_list() == ["no_content"]


def test_unusable_sources_fail_fast(tmp_path):
    with pytest.raises(SeedSourceError, match="no such file or folder"):
        load_personas(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SeedSourceError, match="empty.jsonl: the seed file is empty"):
        load_personas(str(empty))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "a"}\n')
    with pytest.raises(
        SeedSourceError,
        match=r"not a persona source: expected columns \{persona\}, found \['text'\]",
    ):
        load_personas(str(wrong))
    with pytest.raises(SeedSourceError, match="dataset id 'nobody/no-such-dataset'"):
        load_personas("nobody/no-such-dataset")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("\n\nHuman: hi\n\nAssistant: hello", None),
        (
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?",
            "does not end with an 'Assistant:' turn",
        ),
        ("\n\nAssistant: hello", "turn 1 is 'assistant' out of order"),
        ("preamble\n\nHuman: hi\n\nAssistant: x", "text before the first"),
        ("just text", "text before the first"),
        ("", "no 'Human:'/'Assistant:' turns"),
    ],
)
def test_parse_dialogue(text, error):
    if error is None:
        assert parse_dialogue(text) == [("user", "hi"), ("assistant", "hello")]
    else:
        with pytest.raises(ValueError, match=error):
            parse_dialogue(text)


def test_non_utf8_and_oversized_records_cost_only_themselves(tmp_path):
    from synth.loaders import MAX_FIELD_CHARS

    f = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"instruction": "Keep me."}).encode(),
        b'{"instruction": "caf\xe9 au lait, latin-1 bytes"}',
        json.dumps({"instruction": "x" * (MAX_FIELD_CHARS + 1)}).encode(),
        json.dumps(
            {"instruction": "Fine", "instances": [{"input": "", "output": "\udcff"}]}
        ).encode(),
        json.dumps({"instruction": ["not", "text"]}).encode(),
        json.dumps({"other": "no instruction"}).encode(),
        json.dumps({"instruction": ""}).encode(),
        json.dumps({"instruction": "Keep me too."}).encode(),
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    r = load_instructions(str(f))
    assert r.n_in == 8 and r.kept.height + r.rejected.height == 8
    assert r.kept["instruction"].to_list() == ["Keep me.", "Keep me too."]
    got = {d["source_index"]: (d["reason"], d["detail"]) for d in r.rejected.to_dicts()}
    assert got[1][0] == "not_utf8" and "record 1: field 'instruction'" in got[1][1]
    assert got[2][0] == "oversized" and "field 'instruction' has 100001 characters" in got[2][1]
    assert got[3][0] == "not_utf8" and "field 'instances[0].output'" in got[3][1]
    assert got[4][0] == "wrong_type" and "field 'instruction'" in got[4][1]
    assert got[5][0] == "missing_field" and got[6][0] == "empty_field"
    # the stored payload is valid text, and short
    payloads = {d["source_index"]: d["payload"] for d in r.rejected.to_dicts()}
    assert "caf\ufffd" in payloads[1] and len(payloads[2]) < 2000
