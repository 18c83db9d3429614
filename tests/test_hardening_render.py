"""Templates render under a budget per row (steps, CPU, characters): a runaway row is its dead letter,
a template over budget on most rows stops the job, and rendering runs off the event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pytest

import backfill
from backfill.engine import open_store
from backfill.errors import BackfillError
from backfill.prompt import PromptTemplate, RenderBudget, RenderBudgetError
from backfill.sim import SimConfig, Simulator
from backfill.status import JobStatus
from conftest import make_rows

NESTED = "{% for i in range(n) %}{% for j in range(n) %}x{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    "template",
    [
        NESTED.replace("n)", "10**4)"),
        "{% for i in range(10**4) %}{% for j in range(10**4) %}{% endfor %}{% endfor %}",
        "{% for a in text %}{% for b in text %}{% for c in text %}{% endfor %}{% endfor %}{% endfor %}",
        "{{ '%0400000000d' % 1 }}",
        "{{ '%*d' % (400000000, 1) }}",
        "{{ '{:>50000000}'.format(1) }}",
        "{{ '{:>{w}}'.format(1, w=50000000) }}",
        "{{ 'x' * 10**9 }}",
        "{{ text * 10**8 }}",
        "{{ 'x'|center(10**9) }}",
        "{{ range(10**5)|join('x' * 10**6) }}",
        "{{ ('x' * 10**6).join(range(10**4)|map('string')) }}",
        "{{ ('x' * 10**6)|replace('', 'yyyyyyyyyy') }}",
        "{% set ns = namespace(s='x' * 10**6) %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='x' * 10**6) %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% set s %}{% for i in range(10**4) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}{{ s|length }}",
        "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
        "{{ ((10**1000)**1000)**1000 }}",
    ],
)
def test_a_runaway_render_is_stopped_with_a_sentence_naming_the_limit(template: str) -> None:
    with pytest.raises(RenderBudgetError) as e:
        PromptTemplate(prompt=template).render({"text": "abcdefghij" * 20, "n": 10**4})
    message = str(e.value)
    assert message.startswith("The template went over its render budget on this row (") and len(message) < 200
    assert e.value.limit in message


def test_the_budget_is_the_templates_own_and_ordinary_templates_fit_it() -> None:
    t = PromptTemplate(prompt=NESTED, budget=RenderBudget(steps=1_000))
    assert t.render({"n": 20})[0]["content"] == "x" * 400  # 420 steps
    with pytest.raises(RenderBudgetError, match="1,000 loop steps"):
        t.render({"n": 40})
    small = PromptTemplate(prompt="{{ text ~ text }}", budget=RenderBudget(chars=10))
    assert small.render({"text": "abcde"})[0]["content"] == "abcdeabcde"
    with pytest.raises(RenderBudgetError, match="more than 10 characters"):
        small.render({"text": "abcdef"})
    ordinary = PromptTemplate(
        prompt="{% for t in tags %}- {{ t|upper }}\n{% endfor %}{{ text[:10] }} {{ '%05d' % n }} {{ '{:>4}'.format(n) }} {{ text|replace('a', 'bb') }}"
    )
    out = ordinary.render({"tags": ["a", "b"], "text": "a long text", "n": 7})[0]["content"]
    assert out == "- A\n- B\na long tex 00007    7 bb long text"
    big = PromptTemplate(prompt="{{ '{:,}'.format(ts) }} {{ '%d'|format(ts) }} {{ missing|default(ts) }} {{ text|truncate(10**9) }}")
    assert big.render({"ts": 1_700_000_000, "missing": None, "text": "t"})[0]["content"] == "1,700,000,000 1700000000  t"


async def test_a_row_over_budget_is_its_dead_letter_and_the_other_rows_succeed(tmp_path: Path) -> None:
    rows = make_rows(9).append_column("n", pa.array([1, 2, 3, 4, 5, 6, 7, 10**4, 8]))  # the plan tries rows 0-4
    async with Simulator(SimConfig()) as sim:
        out = await backfill.arun(
            rows.to_pandas(), prompt="{{ text }}: " + NESTED, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
            id_column="id", state_dir=tmp_path, progress=False, return_type="arrow",
        )
    status = dict(zip(out.column("id").to_pylist(), out.column("status").to_pylist()))
    errors = dict(zip(out.column("id").to_pylist(), out.column("error").to_pylist()))
    assert status.pop("id-000007") == "failed" and set(status.values()) == {"ok"}
    assert errors["id-000007"] == "template: The template went over its render budget on this row (more than 250,000 loop steps and calls); simplify the template."
    store = open_store(tmp_path)
    [dead] = store.dead_letters(store.list_jobs()[0].id)
    store.close()
    assert dead.row_id == "id-000007"


def test_a_template_over_budget_on_most_of_the_first_rows_stops_the_job(tmp_path: Path) -> None:
    widths = [400_000_000 if i >= 5 and i % 3 else 1 for i in range(300)]  # the plan tries rows 0-4
    rows = make_rows(300).append_column("w", pa.array(widths))
    over = sum(w > 1 for w in widths[:100])
    with pytest.raises(BackfillError) as e:
        backfill.run(  # the in-process simulator: the job stops before any request is sent
            rows.to_pandas(), prompt="{{ text }}{{ '%0*d' % (w, 1) }}", model="gpt-4o-mini", provider="sim", id_column="id",
            state_dir=tmp_path, progress=False, return_type="arrow",
        )
    assert f"went over its render budget (a value of more than 8,000,000 characters) on {over} of the first 100 rows" in str(e.value)
    store = open_store(tmp_path)
    job = store.list_jobs()[0]
    store.close()
    assert job.status is JobStatus.FAILED and job.rows_ok == 0


async def test_a_slow_render_does_not_block_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rendered on the loop, no other task can run while a row renders; rendered off it, the loop keeps
    # turning. Each slow row (202,500 steps) renders for a long while, so a ticker on the loop must move
    # during some of them: counted by the ticks seen at the start and the end of each render, not by time.
    ticks = 0
    moved: list[bool] = []
    render = PromptTemplate.render

    def watched(self: PromptTemplate, row: dict) -> list[dict[str, str]]:
        before = ticks
        try:
            return render(self, row)
        finally:
            moved.append(ticks > before)

    monkeypatch.setattr(PromptTemplate, "render", watched)
    rows = make_rows(20).append_column("n", pa.array([1] * 5 + [450] * 15))
    async with Simulator(SimConfig()) as sim:

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            out = await backfill.arun(
                rows.to_pandas(), prompt=NESTED.replace("x", "") + "{{ text }}", model="gpt-4o-mini", provider="sim",
                base_url=sim.base_url, id_column="id", state_dir=tmp_path, progress=False, return_type="arrow", chunk_size=20,
            )
        finally:
            ticker.cancel()
    assert set(out.column("status").to_pylist()) == {"ok"}
    assert sum(moved) >= 5, moved  # the loop ran during the renders (on the loop: never)
