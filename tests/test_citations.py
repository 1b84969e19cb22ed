"""Citations from any model: attribution of uncited sentences, the citation policies, and the
sentence-by-sentence stream giving the same text and report as the whole answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.grounding import Citer, check, sentence_spans
from server.rag import RAGContext, SentenceStream

PASSAGES = [
    "Zorvania is a small island kingdom. The capital of Zorvania is Quelthar, a harbour city.",
    "Brindle engines run on compressed kelp oil and need servicing every ninety days.",
]
ANSWER = ("The capital of Zorvania is Quelthar. Brindle engines run on kelp oil [2]. "
          "I don't know more. Purple bananas orbit Mars [1].")


def test_auto_keeps_the_models_citations_and_cites_the_rest(tiny_colbert):
    text, report = check(ANSWER, PASSAGES, tiny_colbert, threshold=0.8, citations="auto")
    assert text == ("The capital of Zorvania is Quelthar [1]. Brindle engines run on kelp oil "
                    "[2]. I don't know more. Purple bananas orbit Mars [1].")
    s = report.sentences
    assert [c.citations for c in s] == [[1], [2], [], [1]]
    assert [c.attributed for c in s] == [[1], [], [], []]  # only the first was added
    assert s[0].supported and s[1].supported and s[3].supported is False
    assert s[2].support is None  # a refusal is never attributed
    assert report.attributed == 1 and report.unsupported == 1


def test_model_policy_adds_nothing(tiny_colbert):
    text, report = check(ANSWER, PASSAGES, tiny_colbert, threshold=0.8, citations="model")
    assert text == ANSWER and report.attributed == 0
    assert report.sentences[0].citations == [] and report.sentences[0].support is None


def test_attribute_policy_replaces_the_models_citations(tiny_colbert):
    text, report = check(ANSWER, PASSAGES, tiny_colbert, threshold=0.8, citations="attribute")
    # the model's [2] was right: removed, then attributed again; its [1] on the made-up
    # sentence is gone and nothing supports that sentence
    assert text == ("The capital of Zorvania is Quelthar [1]. Brindle engines run on kelp oil "
                    "[2]. I don't know more. Purple bananas orbit Mars.")
    assert all(c.citations == c.attributed for c in report.sentences)


def test_unsupported_sentences_stay_uncited(tiny_colbert):
    text, report = check("Quokkas juggle saxophones nightly.", PASSAGES, tiny_colbert,
                         threshold=0.8, citations="auto")
    assert text == "Quokkas juggle saxophones nightly." and report.attributed == 0
    assert report.sentences[0].supported is None


def test_layout_between_sentences_is_kept(tiny_colbert):
    answer = "Brindle engines run on kelp oil.\n\n- The capital of Zorvania is Quelthar.\n"
    text, _ = check(answer, PASSAGES, tiny_colbert, threshold=0.8, citations="auto")
    assert text == ("Brindle engines run on kelp oil [2].\n\n- The capital of Zorvania is "
                    "Quelthar [1].\n")


def test_no_passages_no_attribution(tiny_colbert):
    text, report = check("The capital is Quelthar.", [], tiny_colbert, citations="auto")
    assert text == "The capital is Quelthar." and report.sentences[0].citations == []


def test_bad_policy_is_an_error(tiny_colbert):
    with pytest.raises(ValueError, match="citations"):
        Citer(tiny_colbert, PASSAGES, citations="always")


class _Service:
    """What SentenceStream needs of RAGService, running the encoder inline."""

    def __init__(self, encoder: object, citations: str) -> None:
        self.encoder, self.citations = encoder, citations

    def citer(self, ctx: RAGContext) -> Citer:
        return Citer(self.encoder, PASSAGES, citations=self.citations, threshold=0.8)

    async def run(self, fn, *args):
        return fn(*args)

    def reported(self, ctx, report):
        return report


def _stream(encoder: object, answer: str, cuts: list[int], policy: str) -> tuple[list[str], object]:
    ctx = SimpleNamespace()
    stream = SentenceStream(_Service(encoder, policy), ctx)  # type: ignore[arg-type]

    async def go() -> list[str]:
        out = []
        for c in sorted(set(cuts)):
            out.append(await stream.feed(answer[:c], final=False))
        out.append(await stream.feed(answer, final=True))
        return out

    return asyncio.run(go()), stream.report()


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(ANSWER)), max_size=12),
       policy=st.sampled_from(["auto", "attribute"]))
def test_stream_equals_the_whole_answer(tiny_colbert, cuts, policy):
    """However the text arrives, the stream sends the same cited text and report as
    :func:`check` on the finished answer, and each piece is whole sentences."""
    pieces, report = _stream(tiny_colbert, ANSWER, cuts, policy)
    text, whole = check(ANSWER, PASSAGES, tiny_colbert, threshold=0.8, citations=policy)
    assert "".join(pieces) == text
    assert [(c.text, c.citations, c.attributed) for c in report.sentences] == \
           [(c.text, c.citations, c.attributed) for c in whole.sentences]
    for piece in pieces[:-1]:
        if piece:
            assert sentence_spans(piece.strip())[-1][1] == len(piece.strip())


def test_stream_holds_only_the_sentence_being_written(tiny_colbert):
    first = "The capital of Zorvania is Quelthar. "
    pieces, _ = _stream(tiny_colbert, ANSWER, [len(first) - 5, len(first) + 3], "auto")
    assert pieces[0] == ""  # mid-sentence: nothing yet
    assert pieces[1] == "The capital of Zorvania is Quelthar [1]."


def test_a_weak_attribution_is_cited_and_reported_unsupported(tiny_colbert):
    """Below the grounding threshold but above the attribution threshold: cited (the best
    passage there is), and the report says the support is weak; strip mode does not attribute
    it, so attribution never gets a sentence removed."""
    sentence = "Quelthar exports purple bananas to Mars."
    strong, _ = check(sentence, PASSAGES, tiny_colbert, threshold=0.99, citations="auto")
    support = Citer(tiny_colbert, PASSAGES, threshold=-1.0)
    support.cite([sentence])
    best = support.report.sentences[0].support
    text, report = check(sentence, PASSAGES, tiny_colbert, threshold=best + 0.01,
                         attribution_threshold=best - 0.01, citations="auto")
    assert text == "Quelthar exports purple bananas to Mars [1]." and strong == sentence
    assert report.sentences[0].attributed == [1] and report.sentences[0].supported is False
    text, report = check(sentence, PASSAGES, tiny_colbert, mode="strip", threshold=best + 0.01,
                         attribution_threshold=best - 0.01, citations="auto")
    assert text == sentence and report.removed_sentences == 0
