"""StepLogits: one step's logits, computed only for the rows and the form the sampler asks for.

The runner hands the sampler the final hidden states of the sampled positions; the sampler
asks for full logit rows where it needs a distribution (sampling, penalties, logprobs) and
for bare argmaxes where a row is plainly greedy, which a model with a logit screen
(`LlamaForCausalLM.enable_logit_screen`) answers without computing the whole lm_head.
"""

from __future__ import annotations

from collections import abc

import torch

from worker.models.llama import LlamaForCausalLM


class StepLogits:
    """Logits of `hidden` [S, hidden_size] (model dtype), row i ↔ the step's i-th sampled
    sequence; vocab: the token ids the sampler may pick (the first `vocab` columns)."""

    def __init__(self, model: LlamaForCausalLM, hidden: torch.Tensor, vocab: int) -> None:
        self._model = model
        self._hidden = hidden
        self._full: torch.Tensor | None = None
        self.vocab = vocab

    def __len__(self) -> int:
        return self._hidden.shape[0]

    @property
    def screened(self) -> bool:
        """Whether `argmax` skips the full lm_head (the model has a logit screen)."""
        return self._model.logit_screen is not None

    def full(self) -> torch.Tensor:
        """[S, >= vocab] logits in the model dtype (computed once)."""
        if self._full is None:
            self._full = self._model.compute_logits(self._hidden)
        return self._full

    def rows(self, rows: abc.Sequence[int]) -> torch.Tensor:
        """[len(rows), >= vocab] logits of those rows only."""
        if len(rows) == len(self):
            return self.full()
        if self._full is not None:
            return self._full[self._index(rows)]
        return self._model.compute_logits(self._hidden[self._index(rows)])

    def argmax(self, rows: abc.Sequence[int]) -> list[int]:
        """The greedy token of each of `rows` (the first index of its largest float32 logit),
        through the model's logit screen: only while `screened`."""
        hidden = self._hidden if len(rows) == len(self) else self._hidden[self._index(rows)]
        return self._model.greedy_tokens(hidden, self.vocab).tolist()

    def _index(self, rows: abc.Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(rows), dtype=torch.long, device=self._hidden.device)
