"""Structured output in the engine: constrained speculation equals constrained plain
decoding token for token (the F16 copy, ten schemas of different shapes, T=0 and seeded
T=1), every reply validates, forced tokens are counted; the grammar's tree surgery and the
tool-call reader on their own."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from draft_model.checkpoint import load_checkpoint
from draft_model.shipped import SHIPPED_DRAFT
from draft_model.target_weights import read_target_weights
from server.constraints.tools import ToolCallParser, call_text, tools_lark
from server.engine import Engine
from server.engine.sequence import Sequence
from server.speculation.draft_proposer import DraftProposer, TreeShape
from server.speculation.grammar_tree import constrain_tree
from server.speculation.hybrid import HybridProposer
from server.speculation.ngram import NgramProposer
from server.speculation.tree import DraftTree
from tests.conftest import make_target
from verifier.grammar import GrammarCompiler, GrammarError
from verifier.sampling import SamplingParams

CASES = json.loads((Path(__file__).resolve().parent.parent / "scripts" / "data"
                    / "extraction_prompts.json").read_text())
TEN_SHAPES = CASES[:10]  # flat, nested, arrays of objects, enums, $ref, anyOf, null, ...
MAX_NEW = 200  # every schema bounds its strings and arrays: replies end well before this
GREEDY = SamplingParams(temperature=0)
SEEDED = SamplingParams(temperature=1.0, seed=99)


@pytest.fixture(scope="module")
def target(f16_model):
    chains = make_target(f16_model, num_slots=2, max_tree_nodes=8, max_tree_branches=1)
    yield chains
    chains.close()


@pytest.fixture(scope="module")
def compiler(target):
    return GrammarCompiler(target.tokenizer)


def constrained(target, compiler, cases, params) -> list[Sequence]:
    return [Sequence(target.tokenizer.encode(target.chat_template.render(
                         [{"role": "user", "content": case["prompt"]}])),
                     params, MAX_NEW, [], sink=lambda event: None,
                     grammar=compiler.grammar(compiler.json_schema(case["schema"])))
            for case in cases]


def run(engine: Engine, sequences: list[Sequence]) -> list[Sequence]:
    for sequence in sequences:
        engine.submit(sequence)
        while not sequence.is_finished:
            engine.step()
    return sequences


def texts(target, sequences) -> list[str]:
    return [target.tokenizer.decode(sequence.output_tokens) for sequence in sequences]


@pytest.fixture(scope="module")
def plain(target, compiler):
    return run(Engine(target), constrained(target, compiler, TEN_SHAPES, GREEDY))


def test_constrained_plain_replies_validate_under_their_schemas(target, plain):
    for case, text, sequence in zip(TEN_SHAPES, texts(target, plain), plain, strict=True):
        assert sequence.finish_reason == "stop", (case["name"], text)
        jsonschema.validate(json.loads(text), case["schema"])
        assert sequence.num_forced == 0  # plain decoding proposes nothing


def test_constrained_lookup_and_draft_equal_constrained_plain_token_for_token(
        target, compiler, plain, f16_model):
    lookup = NgramProposer(max_tokens=7)
    draft = load_checkpoint(SHIPPED_DRAFT, read_target_weights(f16_model), "cpu")
    hybrid = HybridProposer(DraftProposer(draft, TreeShape(top_k=2, depth=3, total_tokens=6)),
                            NgramProposer(max_tokens=7))
    expected = [sequence.output_tokens for sequence in plain]
    for engine in (Engine(target, lookup), Engine(target, hybrid)):
        sequences = run(engine, constrained(target, compiler, TEN_SHAPES, GREEDY))
        assert [s.output_tokens for s in sequences] == expected
        forced = sum(s.num_forced for s in sequences)
        tokens = sum(len(s.output_tokens) for s in sequences)
        assert forced > tokens / 5, f"the grammar forced only {forced} of {tokens} tokens"
        assert forced <= sum(s.num_accepted for s in sequences)
        steps = sum(s.num_verify_steps for s in sequences)
        assert steps < sum(p.num_verify_steps for p in plain)


def test_seeded_constrained_sampling_with_lookup_equals_plain_sampling(target, compiler):
    cases = TEN_SHAPES[:5]
    plain = run(Engine(target), constrained(target, compiler, cases, SEEDED))
    spec = run(Engine(target, NgramProposer(max_tokens=7)),
               constrained(target, compiler, cases, SEEDED))
    assert [s.output_tokens for s in spec] == [s.output_tokens for s in plain]
    assert sum(s.num_forced for s in spec) > 0
    for case, text in zip(cases, texts(target, spec), strict=True):
        jsonschema.validate(json.loads(text), case["schema"])


def test_events_say_where_each_token_came_from(target, compiler):
    """The chat page's view: forced, drafted (lookup) and the target's own tokens, whose
    texts add up to the reply; tokens per step add up to the tokens chosen."""
    events = []
    sequence = constrained(target, compiler, TEN_SHAPES[:1], GREEDY)[0]
    sequence.track_sources, sequence.sink = True, events.append
    run(Engine(target, NgramProposer(max_tokens=7)), [sequence])
    sources = [source for event in events for _, source in event.sources]
    assert "".join(event.text for event in events) == \
        "".join(piece for event in events for piece, _ in event.sources)
    assert sources.count("forced") == sequence.num_forced > 0
    assert sources.count("target") == sequence.num_verify_steps - 1  # the last chose EOS
    assert set(sources) <= {"forced", "lookup", "target"}
    assert sum(n for event in events for n in event.steps) == sequence.num_chosen


def test_the_tree_gets_the_forced_chain_first_and_loses_forbidden_branches(target, compiler):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    grammar = compiler.grammar(compiler.json_schema(schema))
    forced = grammar.forced_tokens()
    assert target.tokenizer.decode(forced).startswith('{"answer')
    hello = target.tokenizer.encode("hello")[0]
    # root → forced[0] → forced[1] → hello ; root → hello → forced[0]
    tree = DraftTree([7, forced[0], hello, forced[1], hello, forced[0]], [-1, 0, 0, 1, 3, 2],
                     [0, 1, 1, 2, 3, 2], [1.0, 0.5, 0.4, 0.5, 0.5, 0.5])
    cut, num_forced = constrain_tree(tree, grammar, max_nodes=16)
    assert num_forced == len(forced)
    assert cut.tokens[: 1 + num_forced] == [7, *forced]
    assert cut.parents[: 1 + num_forced] == list(range(-1, num_forced))
    assert hello not in cut.tokens  # off the forced text, or not JSON at all
    # the state did not move: the same forced text is still ahead
    assert grammar.forced_tokens() == forced
    assert cut.origins is None  # a tree without origins (one proposer's) keeps none
    labelled = DraftTree(tree.tokens, tree.parents, tree.depths, tree.draft_probs,
                         ["root", "draft", "lookup", "draft", "lookup", "draft"])
    origins = constrain_tree(labelled, grammar, max_nodes=16)[0].origins
    assert origins[: 1 + num_forced] == ["root"] + ["forced"] * num_forced
    small, num_forced = constrain_tree(tree, grammar, max_nodes=2)
    assert len(small.tokens) == 2 and num_forced == 1


def test_inside_free_text_only_forbidden_drafts_go(target, compiler):
    grammar = compiler.grammar(compiler.json_schema(
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
         "required": ["name"], "additionalProperties": False}))
    for token in grammar.forced_tokens():
        grammar.consume(token)
    opening = target.tokenizer.encode(' "')  # the string's opening quote, then free text
    for token in opening[: grammar.valid_prefix(opening)]:
        grammar.consume(token)
    assert grammar.forced_tokens() == []
    ada, newline = target.tokenizer.encode("Ada")[0], target.tokenizer.encode("\n")[0]
    tree = DraftTree([5, ada, newline], [-1, 0, 0], [0, 1, 1], [1.0, 0.6, 0.3])
    cut, num_forced = constrain_tree(tree, grammar, max_nodes=8)
    assert num_forced == 0 and cut.tokens == [5, ada]  # JSON strings hold no raw newline
    whole = DraftTree([5, ada], [-1, 0], [0, 1], [1.0, 0.6])
    assert constrain_tree(whole, grammar, max_nodes=8) == (whole, 0)


def test_schemas_that_cannot_compile_raise_with_the_reason(compiler):
    for schema, reason in (({"type": "strin"}, "strin"),
                           ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
                           ({"$ref": "#/$defs/missing"}, "missing")):
        with pytest.raises(GrammarError, match=reason):
            compiler.grammar(compiler.json_schema(schema))


CALLS = (call_text("get_weather", '{"city": "Pa}r\\"is", "days": [1, {"x": 2}]}') + "\n"
         + call_text("get_time", "{}"))


def streamed(parser: ToolCallParser, text: str, step: int) -> tuple[str, dict[int, dict]]:
    content, calls = "", {}
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    for piece in pieces:
        more, deltas = parser.push(piece)
        content += more
        for delta in deltas:
            call = calls.setdefault(delta["index"], {"arguments": ""})
            if "id" in delta:
                call.update(id=delta["id"], name=delta["function"]["name"])
            call["arguments"] += delta["function"]["arguments"]
    return content + parser.flush(), calls


@pytest.mark.parametrize("step", [1, 3, len(CALLS)])
def test_tool_calls_stream_in_pieces_that_add_up_to_the_whole(step):
    parser = ToolCallParser(may_answer=True)
    content, calls = streamed(parser, CALLS, step)
    assert content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("get_weather", '{"city": "Pa}r\\"is", "days": [1, {"x": 2}]}'), ("get_time", "{}")]
    assert [c["id"] for c in calls.values()] == [call.id for call in parser.calls]
    assert json.loads(parser.calls[0].arguments)["city"] == 'Pa}r"is'


def test_only_complete_calls_count_as_made():
    parser = ToolCallParser(may_answer=False)
    cut = CALLS.index('"days"')
    parser.push(CALLS[:cut])
    assert parser.calls and not parser.made_calls  # a stop string or a limit cut it here
    parser.push(CALLS[cut:])
    assert parser.made_calls and len(parser.calls) == 2


@pytest.mark.parametrize("text", ["<tool is not a call", "Hello <tool_call>", "<tool"])
def test_an_answer_that_only_begins_like_a_call_is_content(text):
    content, calls = streamed(ToolCallParser(may_answer=True), text, 1)
    assert content == text and calls == {}


def test_the_tools_grammar_holds_calls_to_declared_functions_and_valid_arguments(
        target, compiler):
    functions = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"], "additionalProperties": False},
                 "get_time": {"type": "object", "properties": {}}}
    tokenizer = target.tokenizer

    def allowed(text: str, may_answer: bool) -> bool:
        grammar = compiler.grammar(compiler.lark(tools_lark(functions, may_answer, True)))
        tokens = tokenizer.encode(text)
        return grammar.valid_prefix(tokens) == len(tokens)

    good = call_text("get_weather", '{"city": "Oslo"}')
    assert allowed(good, may_answer=False) and allowed(CALLS.replace(
        '"Pa}r\\"is", "days": [1, {"x": 2}]', '"Pa}r\\"is"'), may_answer=False)
    assert not allowed(call_text("get_wether", '{"city": "Oslo"}'), may_answer=False)
    assert not allowed(call_text("get_weather", '{"town": "Oslo"}'), may_answer=False)
    assert not allowed("It is sunny.", may_answer=False)  # required: a call
    assert allowed("It is sunny.", may_answer=True)
