"""Prompt templates: rendering rows into messages, column checks, and the sandbox."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill.errors import BackfillError, SpecError
from backfill.prompt import PromptError, PromptTemplate, check_columns, check_text_columns


def test_prompt_and_system_render_to_messages() -> None:
    t = PromptTemplate(prompt="Classify: {{ text }}\n", system="You label {{ kind }}.")
    assert t.variables == {"text", "kind"}
    assert t.render({"text": "buy now", "kind": "spam", "unused": 1}) == [
        {"role": "system", "content": "You label spam."},
        {"role": "user", "content": "Classify: buy now\n"},  # trailing newline kept
    ]


def test_messages_list_and_render_text() -> None:
    t = PromptTemplate(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q: {{ q }}"},
            {"role": "assistant", "content": "OK."},
            {"role": "user", "content": "{% for t in tags %}#{{ t }} {% endfor %}"},
        ]
    )
    assert t.variables == {"q", "tags"}
    row = {"q": "why?", "tags": ["a", "b"]}
    assert [m["role"] for m in t.render(row)] == ["system", "user", "assistant", "user"]
    assert t.render_text(row) == "Q: why?\n\n#a #b "


def test_values_as_pyarrow_gives_them() -> None:
    t = PromptTemplate(
        prompt='{{ name }}|{{ missing_value }}|{{ n + 1 }}|{{ meta.city }}|{{ meta | tojson }}|{{ row["first name"] }}'
    )
    row = {"name": "Zoë", "missing_value": None, "n": 41, "meta": {"city": "Köln", "tag": "<b>&"}, "first name": "Ann"}
    (message,) = t.render(row)
    # Null renders as nothing; tojson is plain JSON (no HTML escaping); odd column names via row[...].
    assert message["content"] == 'Zoë||42|Köln|{"city": "Köln", "tag": "<b>&"}|Ann'
    assert "row" not in t.variables


def test_missing_column_is_named_before_the_run() -> None:
    t = PromptTemplate(prompt="{{ titel }} by {{ author }} ({{ year }})")
    check_columns(PromptTemplate(prompt="{{ title }}"), ["title", "body"])
    with pytest.raises(SpecError) as e:
        check_columns(t, ["title", "author", "body"])
    msg = str(e.value)
    assert "'titel' (did you mean 'title'?)" in msg and "'year'" in msg
    assert "available columns: title, author, body" in msg
    assert "'author'" not in msg.split(";")[0]


def test_row_failure_is_a_prompt_error() -> None:
    t = PromptTemplate(prompt="{{ meta.city }} {{ n / d }}")
    with pytest.raises(PromptError, match="failed on this row"):
        t.render({"meta": {}, "n": 1, "d": 1})
    with pytest.raises(PromptError, match="ZeroDivisionError"):
        t.render({"meta": {"city": "x"}, "n": 1, "d": 0})
    assert issubclass(PromptError, BackfillError) and not issubclass(PromptError, SpecError)


def test_syntax_errors_name_the_template_and_line() -> None:
    with pytest.raises(SpecError, match=r"The prompt template has a syntax error on line 2: .*"):
        PromptTemplate(prompt="fine\n{{ broken }")
    with pytest.raises(SpecError, match=r"messages\[1\] template has a syntax error on line 1"):
        PromptTemplate(messages=[{"role": "system", "content": "ok"}, {"role": "user", "content": "{% if %}"}])


def test_bad_shapes_are_spec_errors() -> None:
    with pytest.raises(SpecError, match="either a prompt or a messages list"):
        PromptTemplate()
    with pytest.raises(SpecError, match="either a prompt or a messages list"):
        PromptTemplate(prompt="a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(SpecError, match="role is 'bot'"):
        PromptTemplate(messages=[{"role": "bot", "content": "b"}])
    with pytest.raises(SpecError, match="no user message"):
        PromptTemplate(messages=[{"role": "system", "content": "b"}])
    with pytest.raises(SpecError, match="content must be a text template"):
        PromptTemplate(messages=[{"role": "user", "content": ["b"]}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ text.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ namespace.__init__.__globals__['os'] }}",
        "{{ self.__init__.__globals__ }}",
        "{{ tags.append('x') }}",
        "{{ meta.update({'a': 1}) }}",
        "{{ meta.clear() }}",
        "{{ 'a' * 1000000000 }}",
        "{{ [1] * 1000000000 }}",
        "{{ 2 ** 100000000 }}",
        "{{ range(10 ** 9) | list }}",
        "{{ lipsum(100000) }}",
        "{{ text.format.__globals__ }}",
        "{{ '{0.__class__}'.format(text) }}",
    ],
)
def test_sandbox_refuses_escapes(template: str) -> None:
    t = PromptTemplate(prompt=template)
    row = {"text": "hi", "tags": ["a"], "meta": {"k": 1}}
    with pytest.raises(PromptError) as e:
        t.render(row)
    assert len(str(e.value)) < 300
    assert row == {"text": "hi", "tags": ["a"], "meta": {"k": 1}}


def test_safe_arithmetic_still_works() -> None:
    t = PromptTemplate(prompt="{{ '-' * 3 }}{{ 2 ** 10 }}{{ n * 2 }}{{ text.upper() }}{{ '{:>4}'.format(n) }}")
    assert t.render({"n": 7, "text": "ok"})[0]["content"] == "---102414OK   7"


@pytest.mark.parametrize(
    "template",
    [
        "{{ text }}",
        "Q: {{ text }}\nA ({{ n }}, {{ x }}, {{ flag }}, {{ empty }}, {{ items }}):",
        "  {{- text -}}  \n{{ n }}\n",
        '{{ row["first name"] }} / {{ text }}',  # not plain substitution: Jinja renders it
        "{{ text | upper }} {% if n %}{{ n }}{% endif %}",
    ],
)
def test_plain_substitution_renders_exactly_as_jinja(template: str) -> None:
    """Templates made only of text and {{ column }} skip Jinja's render; the text must be the same."""
    rows = [
        {"text": "héllo {{ not a tag }}", "n": 3, "x": 0.25, "flag": True, "empty": None, "items": [1, "a"], "first name": "Ada"},
        {"text": "", "n": None, "x": -1e20, "flag": False, "empty": "", "items": [], "first name": None},
    ]
    fast = PromptTemplate(prompt=template, system="Rows: {{ n }}")
    assert (fast._messages[1][2] is not None) == ("row[" not in template and "|" not in template)
    for row in rows:
        expected = [
            {"role": "system", "content": fast._messages[0][1].render({**row, "row": row})},
            {"role": "user", "content": fast._messages[1][1].render({**row, "row": row})},
        ]
        assert fast.render(row) == expected
        assert fast.render_text(row) == expected[1]["content"]


@pytest.mark.parametrize(
    "template",
    ["Say: {{ text }}", "Say: {{ text | upper }}", "{% if n %}{{ text }}{% endif %}", "{{ text | tojson }}"],
)
def test_binary_value_is_never_rendered_as_bytes(template: str) -> None:
    t = PromptTemplate(prompt=template)
    with pytest.raises(PromptError, match=r"^Column 'text' holds binary data, not text; "):
        t.render({"text": b"row 1", "n": 1})
    with pytest.raises(PromptError, match="Column 'text' holds binary data"):
        t.render_text({"text": b"row 1", "n": 1})
    assert "b'" not in t.render({"text": "row 1", "n": 1})[0]["content"]


def test_binary_value_reached_another_way_is_refused() -> None:
    text_row = {"the text": "x", "n": 1}
    assert PromptTemplate(prompt="{{ row | tojson }} {{ row }}").render(text_row)[0]["content"] == (
        '{"the text": "x", "n": 1} ' + str(text_row)
    )
    for template in ('{{ row["the text"] }}', "{{ meta.blob }}", "{{ meta | tojson }}"):
        with pytest.raises(PromptError, match="binary data, not text") as e:
            PromptTemplate(prompt=template).render({"the text": b"x", "meta": {"blob": b"x"}})
        assert "b'x'" not in str(e.value)


def test_binary_columns_used_by_the_template_are_refused_from_the_schema() -> None:
    t = PromptTemplate(prompt="{{ text }} {{ n }}")
    schema = pa.schema([("text", pa.binary()), ("n", pa.int64()), ("blob", pa.large_binary())])
    with pytest.raises(SpecError, match=r"^Column 'text' holds binary data, not text; "):
        check_text_columns(t, schema)
    check_text_columns(PromptTemplate(prompt="{{ n }}"), schema)  # an unused binary column is fine
    with pytest.raises(SpecError, match="Column 'blob' holds binary data"):
        check_text_columns(PromptTemplate(prompt='{{ row["blob"] }}'), pa.schema([("blob", pa.large_binary())]))


def test_plan_refuses_a_binary_column_the_prompt_uses(tmp_path: Path) -> None:
    from backfill.engine import make_plan
    from backfill.spec import from_options

    path = tmp_path / "blobs.parquet"
    # The first rows are null, so only the schema can tell.
    pq.write_table(pa.table({"id": [1, 2, 3], "text": pa.array([None, None, b"row 3"], pa.binary())}), path)
    spec = from_options(input=str(path), prompt="Say: {{ text }}", model="gpt-4o-mini")
    with pytest.raises(SpecError, match=r"^Column 'text' holds binary data, not text; "):
        make_plan(spec)
    frame = pa.table({"id": [1], "text": pa.array([b"row 1"], pa.binary())}).to_pandas()
    frame["text"] = frame["text"].astype(object)
    with pytest.raises(SpecError, match=r"^Column 'text' holds binary data"):
        make_plan(spec, frame)
    assert make_plan(from_options(input=str(path), prompt="Row {{ id }}", model="gpt-4o-mini")).rows_total == 3
