"""`make serve`'s demo, as a new user meets it: the embedded model with an index of the
project's docs/ answers a question about ragserve, and the answer carries a citation (the
model writes none itself: ragserve attributes its sentences)."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
from serverutil import ROOT, start_subprocess, wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory):
    from server.cli import main

    tmp = tmp_path_factory.mktemp("demo")
    assert main(["index", "build", str(ROOT / "docs"), "--out", str(tmp / "index")]) == 0
    # the answer's words decide its citations: float32, the same on every CPU
    proc, url = start_subprocess(["--index", str(tmp / "index"), "--dtype", "float32"],
                                 tmp / "server.log")
    try:
        wait_ready(url, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        print(Path(tmp / "server.log").read_text()[-2000:])


def test_demo_answers_a_question_about_ragserve_with_a_citation(demo_url):
    client = openai.OpenAI(base_url=f"{demo_url}/v1", api_key="unused", max_retries=0,
                           timeout=300)
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=96, temperature=0,
        messages=[{"role": "user", "content": "How do I build an index?"}],
        extra_body={"rag": {"top_k": 3}})
    answer = r.choices[0].message.content
    sources = {s["number"]: s["doc_id"] for s in r.model_extra["sources"]}
    cited = [int(n) for n in re.findall(r"\[(\d+)\]", answer)]
    assert cited and set(cited) <= set(sources), answer
    grounding = r.model_extra["grounding"]
    assert grounding["citations"] == "auto"
    assert grounding["attributed"] + sum(
        len(s["citations"]) - len(s["attributed"]) for s in grounding["sentences"]) >= 1
    assert any(sources[n] == "indexing.md" for n in cited), (answer, sources)
