import argparse

import numpy as np
import pytest

from server.cli import main
from server.settings import Settings, add_arguments, settings_from_args


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_flags_beat_environment_which_beats_defaults(monkeypatch):
    assert parse([]).port == 8000 and parse([]).host == "127.0.0.1"
    monkeypatch.setenv("DOVETAIL_PORT", "9001")
    monkeypatch.setenv("DOVETAIL_FLASH_ATTN", "true")
    assert parse([]).port == 9001 and parse([]).flash_attn is True
    settings = parse(["--port", "9002", "--no-flash-attn", "--ctx-size", "2048"])
    assert (settings.port, settings.flash_attn, settings.ctx_size) == (9002, False, 2048)


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {action.dest for action in parser._actions}
    assert set(Settings.model_fields) <= flags


def test_default_model_is_the_packaged_gguf():
    settings = parse([])
    assert settings.model_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert settings.model_path.is_file()
    assert settings.served_model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert settings.num_threads >= 1


@pytest.mark.parametrize("argv", [["--port", "-1"], ["--ctx-size", "big"],
                                  ["--draft", "/no/such/draft"], ["--max-concurrency", "0"],
                                  ["--extra-buffers", "maybe"]])
def test_invalid_settings_exit_with_a_message(argv, capsys):
    assert main(["serve", *argv]) == 2
    assert "dovetail: --" in capsys.readouterr().err


def test_missing_model_file_exits_with_a_message(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "not found" in capsys.readouterr().err


def test_the_shared_lookup_pool_follows_its_flag():
    from server.builder import build_engine

    for flags, pooled in (([], True), (["--no-lookup-shared"], False)):
        engine = build_engine(parse(["--draft", "ngram", "--no-adaptive-budget",
                                     "--threads", "2", "--max-concurrency", "1", *flags]))
        try:
            assert (engine.proposer.shared is not None) == pooled
        finally:
            engine.target.close()


def test_the_weight_buffers_follow_their_flag():
    from server.builder import build_engine

    for flags, setting in (([], "auto"), (["--extra-buffers", "off"], "off")):
        engine = build_engine(parse(["--draft", "none", "--threads", "2",
                                     "--max-concurrency", "1", "--ctx-size", "256", *flags]))
        try:
            assert engine.target.config.extra_buffers == setting
            target = engine.target
            logits = target.prefill(target.acquire_slot(), [1, 504, 2184]).last_logits
            assert logits.shape == (target.vocab_size,) and np.isfinite(logits).all()
        finally:
            engine.target.close()


def test_with_a_draft_each_request_may_go_to_lookup_alone():
    from server.builder import build_engine
    from verifier.machine import run_on_fresh_thread

    base = ["--draft", "shipped", "--draft-device", "cpu", "--threads", "2",
            "--max-concurrency", "1", "--ctx-size", "512"]
    for flags, chosen in (([], True), (["--no-draft-choice"], False)):
        engine = run_on_fresh_thread(build_engine, parse([*base, *flags]))
        try:
            if chosen:
                draft, lookup = engine.choice.modes
                assert (draft.name, draft.proposer.uses_features, lookup.name,
                        lookup.proposer.uses_features) == ("draft", True, "lookup", False)
                assert draft.proposer is engine.proposer and draft.budget is engine.budget
                assert lookup.proposer is engine.proposer.lookup  # one lookup pool for both
                assert lookup.budget.costs is engine.budget.costs  # one measured T_V
            else:
                assert engine.choice is None
        finally:
            engine.target.close()


def test_which_draft_is_served(tmp_path):
    import torch

    from draft_model.shipped import SHIPPED_DRAFT
    from server.builder import NGRAM, draft_source

    assert draft_source(parse(["--draft", "none"])) is None
    assert draft_source(parse(["--draft", "shipped"])) == SHIPPED_DRAFT
    assert draft_source(parse(["--draft", "ngram"])) == NGRAM
    # auto: the shipped draft only for the default model with the draft on a GPU;
    # elsewhere prompt lookup under the adaptive budget
    assert draft_source(parse(["--draft-device", "cpu"])) == NGRAM
    model = tmp_path / "other.gguf"
    model.write_bytes(b"")
    assert draft_source(parse(["--model", str(model)])) == NGRAM
    on_gpu = torch.cuda.is_available()
    assert draft_source(parse([])) == (SHIPPED_DRAFT if on_gpu else NGRAM)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    assert draft_source(parse(["--draft", str(tmp_path / "mine")])) == tmp_path / "mine"


def test_auto_serves_the_shipped_draft_for_its_model_under_any_path_on_a_gpu(
        monkeypatch, tmp_path, default_model, f16_model):
    """With a GPU, 'auto' recognises the shipped draft's model by what the draft depends on
    (architecture, sizes, tokenizer) — the packaged file named with --model, a copy, the F16
    copy — and serves anything else with prompt lookup."""
    import torch

    import server.builder as builder
    from draft_model.shipped import SHIPPED_DRAFT, fits_shipped_draft
    from verifier.gguf_convert import write_random_llama

    other = write_random_llama(tmp_path / "other.gguf", vocab=512, hidden=128, layers=2,
                               heads=4, kv_heads=2, ffn=256)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    assert fits_shipped_draft(default_model) and fits_shipped_draft(f16_model)
    assert not fits_shipped_draft(other) and not fits_shipped_draft(not_gguf)

    monkeypatch.setattr(builder, "resolve_device", lambda name: torch.device("cuda"))
    for model in (default_model, f16_model):
        assert builder.draft_source(parse(["--model", str(model)])) == SHIPPED_DRAFT
    for model in (other, not_gguf):
        assert builder.draft_source(parse(["--model", str(model)])) == builder.NGRAM
    assert builder.draft_source(parse(["--model", str(default_model), "--draft", "none"])) \
        is None
