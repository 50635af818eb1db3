import pytest

from synth.llm.structured import InvalidSchemaError, check_schema, extract_json, parse_structured

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    ("text", "expected", "reason"),
    [
        ('{"a": 1}', {"a": 1}, None),
        ('Sure! Here it is:\n```json\n{"a": 1}\n```', {"a": 1}, None),
        ('prefix {"a": {"b": [1, 2]}} suffix', {"a": {"b": [1, 2]}}, None),
        ('{"a": 1,}', {"a": 1}, None),
        ('{"a": "x", "b": {"c": 2', {"a": "x", "b": {"c": 2}}, None),  # cut off by max_tokens
        ("no json here at all", None, "no_json_found"),
        ("{not: valid, json}", None, "invalid_json"),
        ("", None, "no_json_found"),
        ('{"s": "a } inside a string"}', {"s": "a } inside a string"}, None),
    ],
)
def test_extract_json_table(text, expected, reason):
    obj, why = extract_json(text)
    assert obj == expected
    assert why == reason


def test_parse_structured_reports_the_violating_field():
    obj, reason, detail = parse_structured('{"name": "Ada", "age": "old"}', PERSON)
    assert obj is None and reason == "schema_violation"
    assert detail.startswith("age:")
    obj, reason, _ = parse_structured('{"name": "Ada", "age": 36}', PERSON)
    assert obj == {"name": "Ada", "age": 36} and reason is None


def test_invalid_schema_names_where_and_path():
    with pytest.raises(
        InvalidSchemaError, match=r"template judge: invalid JSON schema at properties/age"
    ):
        check_schema(
            {"type": "object", "properties": {"age": {"type": "integr"}}}, "template judge"
        )
    with pytest.raises(InvalidSchemaError, match="must be an object"):
        check_schema(["not", "a", "schema"], "setting x")  # type: ignore[arg-type]
