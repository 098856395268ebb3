"""From settings to a running engine: which draft (if any), the target, the budget."""

from __future__ import annotations

import logging
from pathlib import Path

from draft_model.checkpoint import load_checkpoint
from draft_model.device import default_dtype, resolve_device
from draft_model.shipped import SHIPPED_DRAFT, fits_shipped_draft
from draft_model.target_weights import read_target_weights
from server.engine import Engine
from server.settings import Settings
from server.speculation.budget import LookupBudget, TreeBudget
from server.speculation.choice import Mode, ProposerChoice
from server.speculation.draft_proposer import DraftProposer, TreeShape
from server.speculation.hybrid import HybridProposer
from server.speculation.ngram import NgramProposer
from server.speculation.shared_ngrams import SharedNgrams
from verifier.costs import LiveCosts, cached_verify_costs
from verifier.default_model import default_model_path
from verifier.kernels import EXACT, exactness
from verifier.target import Target, TargetConfig

log = logging.getLogger("dovetail.server")

NGRAM = "ngram"


def draft_source(settings: Settings) -> Path | str | None:
    """A draft checkpoint folder, NGRAM (prompt lookup), or None (plain decoding).

    'auto' uses the shipped draft where it is known to pay: with the draft on a GPU and the
    model it was trained for (the default target, or any GGUF of the same model and
    tokenizer: a copy of it, its F16 copy). On a CPU-only machine the shipped draft's
    full-vocabulary head costs more per step than the target saves (see
    docs/draft-model-card.md); there 'auto' uses prompt lookup under the adaptive budget,
    which verifies drafted tokens only while the measured costs and acceptance say they pay.
    """
    if settings.draft in ("none", NGRAM):
        return None if settings.draft == "none" else NGRAM
    if settings.draft == "shipped":
        return SHIPPED_DRAFT
    if settings.draft == "auto":
        on_gpu = resolve_device(settings.draft_device).type == "cuda"
        fits = on_gpu and (_is_default_model(settings.model_path)
                           or fits_shipped_draft(settings.model_path))
        return SHIPPED_DRAFT if fits else NGRAM
    return Path(settings.draft)


def draft_label(settings: Settings) -> str:
    """What /health calls the server's proposer: none, lookup, shipped or a folder's name."""
    source = draft_source(settings)
    if source is None or source == NGRAM:
        return "none" if source is None else "lookup"
    return "shipped" if source == SHIPPED_DRAFT else Path(source).name


def _is_default_model(model_path: Path) -> bool:
    """The packaged default target (the shipped draft's own), known without reading its
    metadata."""
    try:
        return Path(model_path).resolve() == default_model_path().resolve()
    except FileNotFoundError:  # the default model's package is not installed
        return False


def live_costs(target: Target, proposal: str) -> LiveCosts:
    """The budget's T_V: the cached (or now measured) profile, corrected as the engine runs."""
    profile = cached_verify_costs(target)
    log.info("%s, adaptive budget; verification costs (ms): %s", proposal,
             {k: round(v * 1000, 1) for k, v in profile.seconds.items()})
    return LiveCosts(profile)


def log_exactness(exactness: dict) -> None:
    if exactness["identical_to_plain"]:
        log.info("output identical to plain decoding: exact kernels, %s verified",
                 exactness["verifies"])
    elif exactness["flash_attn"]:
        log.info("output equal to plain decoding up to rounding: flash attention sums a "
                 "long context in another order for one token than for several")
    elif exactness["kernels"] != EXACT:
        log.warning("llama.cpp was built with its llamafile kernels, which round a batch "
                    "of tokens differently from one token: output equals plain decoding "
                    "only up to rounding (reinstall with `make setup`, README)")
    else:
        log.info("output equal to plain decoding up to rounding: whole trees verified in "
                 "one shared cache (--no-exact)")


def build_engine(settings: Settings) -> Engine:
    source = draft_source(settings)
    log_exactness(exactness(source in (None, NGRAM) or settings.exact, settings.flash_attn))
    tree_tokens = 1 if source is None else settings.draft_tokens
    target = Target(TargetConfig(
        model_path=settings.model_path,
        num_slots=settings.max_concurrency,
        ctx_size=settings.ctx_size,
        max_tree_nodes=tree_tokens,
        # chains (plain decoding, lookup, or exact with a draft): 1 branch
        max_tree_branches=1 if source in (None, NGRAM) or settings.exact else tree_tokens,
        batch_size=settings.batch_size,
        num_threads=settings.num_threads,
        flash_attn=settings.flash_attn,
        extra_buffers=settings.extra_buffers,
        features=source not in (None, NGRAM),
        reuse_prefixes=settings.prefix_reuse,
    ))
    if source is None:
        return Engine(target)
    shared = SharedNgrams() if settings.lookup_shared else None
    if source == NGRAM:
        proposer = NgramProposer(max_tokens=tree_tokens - 1, shared=shared)
        if not settings.adaptive_budget:
            log.info("prompt lookup: up to %d drafted tokens per step", tree_tokens - 1)
            return Engine(target, proposer)
        costs = live_costs(target, "prompt lookup")
        return Engine(target, proposer, budget=LookupBudget(costs, tree_tokens - 1))
    device = resolve_device(settings.draft_device)
    model = load_checkpoint(source, read_target_weights(settings.model_path), device,
                            default_dtype(device))
    shape = TreeShape(top_k=settings.draft_top_k, depth=settings.draft_depth,
                      total_tokens=settings.draft_tokens)
    log.info("draft %s on %s: %s", source, device, shape)
    proposer = DraftProposer(model, shape, pipeline=settings.draft_ahead)
    proposer.warm_up(settings.max_concurrency, settings.ctx_size + 1)  # CUDA graphs, now
    if not settings.draft_lookup:
        return Engine(target, proposer)
    lookup = NgramProposer(max_tokens=tree_tokens - 1, shared=shared)
    hybrid = HybridProposer(proposer, lookup)
    if not settings.adaptive_budget:
        return Engine(target, hybrid)
    costs = live_costs(target, "draft tree + prompt lookup")
    budget = TreeBudget(costs, chains=settings.exact)
    if not settings.draft_choice:
        return Engine(target, hybrid, budget=budget)
    choice = ProposerChoice([Mode("draft", hybrid, budget),
                             Mode("lookup", lookup, LookupBudget(costs, tree_tokens - 1))])
    return Engine(target, hybrid, budget=budget, choice=choice)
