"""The target's features for training data, from llama.cpp itself (the serving numerics).

One sequence at a time on one slot: a teacher-forced pass over a whole conversation, or a
greedy answer to a prompt whose features come with the generation.
"""

from __future__ import annotations

import numpy as np

from verifier.target import Target


class LlamaFeatureSource:
    def __init__(self, target: Target) -> None:
        self.target = target

    def features(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """[T, H] post-norm features of every token of each sequence."""
        return [self._prefill(tokens)[0] for tokens in sequences]

    def answer(self, prompts: list[list[int]], max_new_tokens: int,
               stop_tokens: set[int]) -> list[tuple[list[int], np.ndarray]]:
        """Greedy answers and the features of prompt + answer, [len(prompt)+len(answer), H]."""
        results = []
        for prompt in prompts:
            features, logits, slot = self._prefill(prompt, keep_slot=True)
            rows, answer = [features], []
            try:
                while len(answer) < max_new_tokens:
                    token = int(np.argmax(logits))
                    answer.append(token)
                    output = self.target.decode(slot, token)
                    self.target.commit(slot, [0])
                    rows.append(output.features)
                    logits = output.logits[0]
                    if token in stop_tokens:
                        break
            finally:
                self.target.release_slot(slot)
            results.append((answer, np.concatenate(rows)))
        return results

    def _prefill(self, tokens: list[int], keep_slot: bool = False):
        slot = self.target.acquire_slot()
        try:
            output = self.target.prefill(slot, tokens)
        except BaseException:
            self.target.release_slot(slot)
            raise
        if not keep_slot:
            self.target.release_slot(slot)
        return output.features, output.last_logits, slot
