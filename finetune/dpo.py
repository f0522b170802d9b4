"""Preference tuning (DPO and TRL's other offline preference losses) on the kit's CogVLM model, through TRL.

TRL's `DPOTrainer` does the preference work: the loss variants (`loss_type`), the reference
log-probabilities (precomputed or on the fly), the reference as the base / starting adapter through
peft (never a second full model in memory), the curves (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected), checkpointing and resume (it is a
transformers `Trainer`). This module only adapts the inputs; two pieces of TRL are replaced, and why:

* **Encoding.** TRL tokenizes `prompt + chosen` / `prompt + rejected` with a chat template, or, for
  vision data, through a `ProcessorMixin` whose images become `pixel_values`. A Cog sequence is
  neither: it is BOS, a span of `image_tokens` placeholders typed VISION in `token_type_ids`, then the
  prompt in the official template, then the answer + EOS, and positions follow the token types. So each
  pair is encoded here with the kit's own `encode_conversation` (the same one SFT and inference use;
  `last_turn_only=True`, so only the final answer is scored), and `CogDPOTrainer._prepare_dataset`
  returns the already-encoded dataset unchanged.
* **Collation.** `PreferenceCollator` yields exactly the columns TRL's `DataCollatorForPreference`
  yields (`input_ids`, `attention_mask`, `completion_mask`, chosen rows first then rejected, plus
  `ref_chosen_logps` / `ref_rejected_logps` when precomputed) and the Cog extras `token_type_ids` and
  `images`, which TRL passes through to the model untouched. `completion_mask` is the kit's label mask
  (answer tokens + EOS). No `position_ids`: the model derives them from the token types.

Everything else is TRL's own code path: its fused LM head (`add_fused_lm_head`) calls the kit's
backbone (`model.model`, the `base_model_prefix`) with these inputs and projects only the completion
positions through `lm_head`, so the kit's labelled-only logits saving carries over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from data_formats.schema import Conversation, Message

from .processing_cogvlm import IGNORE_INDEX, CogVLMCollator, encode_conversation

if TYPE_CHECKING:
    from data_formats.preference import PreferencePair

try:  # trl is optional for SFT; importing this module without it gives a clear message at use
    from trl import DPOTrainer as _DPOTrainer
except ImportError:  # pragma: no cover - trl is in the dev environment
    _DPOTrainer = object


def pair_conversations(pair: PreferencePair) -> tuple[Conversation, Conversation]:
    """(prompt + chosen, prompt + rejected) as two ordinary conversations."""
    p = pair.prompt
    turns = [Message(m.role, m.content) for m in p.messages]
    chosen = Conversation(p.id, list(p.images), turns + [Message("assistant", pair.chosen)], p.source)
    rejected = Conversation(p.id, list(p.images), [Message(m.role, m.content) for m in p.messages]
                            + [Message("assistant", pair.rejected)], p.source)
    return chosen, rejected


def encode_pair(pair: PreferencePair, tokenizer: Any, config: Any, *, template_version: str | None = None,
                max_length: int | None = None, allow_multi_image: bool = False) -> dict[str, Any]:
    """One pair -> a dataset row: chosen_/rejected_ input_ids, token_type_ids, labels, and the image refs.

    Both sides are encoded by `encode_conversation` with `last_turn_only=True`: the labels (and so TRL's
    completion mask) cover the final answer and its EOS only. A side that does not fit raises `RowTooLong`.
    """
    row: dict[str, Any] = {"id": pair.id}
    for side, conv in zip(("chosen", "rejected"), pair_conversations(pair)):
        e = encode_conversation(conv, tokenizer, family_version=config.cogvlm_version,
                                image_tokens=config.image_tokens,
                                template_version=template_version or config.template_version,
                                max_length=max_length, last_turn_only=True, allow_multi_image=allow_multi_image)
        row[f"{side}_input_ids"], row[f"{side}_token_type_ids"], row[f"{side}_labels"] = \
            e.input_ids, e.token_type_ids, e.labels
        row["image_refs"] = [str(r) for r in e.images]
    return row


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, config: Any, **kw: Any) -> list[dict[str, Any]]:
    """`encode_pair` for every pair (kept in order)."""
    return [encode_pair(p, tokenizer, config, **kw) for p in pairs]


@dataclass
class PreferenceCollator:
    """Rows of `encode_pair` -> TRL's preference batch (chosen rows, then rejected rows) + Cog extras.

    Padding, token types and image loading are the kit's `CogVLMCollator`'s (right padding).
    """

    tokenizer: Any
    config: Any

    def __post_init__(self) -> None:
        self._cog = CogVLMCollator(self.tokenizer, self.config)

    def _side(self, rows: Sequence[dict[str, Any]], side: str) -> list[dict[str, Any]]:
        return [{"input_ids": r[f"{side}_input_ids"], "token_type_ids": r[f"{side}_token_type_ids"],
                 "labels": r[f"{side}_labels"], "images": list(r["image_refs"])} for r in rows]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._cog(self._side(rows, "chosen") + self._side(rows, "rejected"))  # (2B, L)
        out = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
            "token_type_ids": batch["token_type_ids"],
        }
        if batch["images"] is not None:
            out["images"] = batch["images"]
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in rows[0]:
                out[key] = torch.tensor([float(r[key]) for r in rows])
        return out


class CogDPOTrainer(_DPOTrainer):  # type: ignore[misc, valid-type]
    """TRL's DPOTrainer, fed rows the kit already encoded (see the module docstring for why).

    Give it `data_collator=PreferenceCollator(...)`, a `datasets.Dataset` of `encode_pair` rows and a
    `DPOConfig` with `remove_unused_columns=False` (TRL would otherwise keep only its own column names).
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Already tokenized with Cog image spans and token types by `encode_pair`; TRL's tokenization
        # (chat template, no VISION span) must not run on it.
        return dataset


@torch.no_grad()
def sequence_logps(model: torch.nn.Module, collator: PreferenceCollator, rows: Sequence[dict[str, Any]],
                   batch_size: int = 8, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected answers, computed from full logits.

    Independent of TRL's fused head on purpose: tests and the proof check TRL's numbers against it.
    `reference=True` disables the peft adapter(s) (the base model).
    """
    import contextlib

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    ctx = model.disable_adapter() if reference and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with ctx:
            for i in range(0, len(rows), batch_size):
                batch = collator(rows[i:i + batch_size])
                mask = batch.pop("completion_mask")
                for key in ("ref_chosen_logps", "ref_rejected_logps"):
                    batch.pop(key, None)
                device = next(model.parameters()).device
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(**batch, use_cache=False, loss_only=False).logits.float()  # (2B, L, V)
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                tok = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # (2B, L-1)
                summed = (tok * mask[:, 1:].to(tok.device)).sum(dim=1).cpu()
                c, r = summed.chunk(2)
                chosen.append(c)
                rejected.append(r)
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_accuracy(model: torch.nn.Module, collator: PreferenceCollator, rows: Sequence[dict[str, Any]],
                        batch_size: int = 8) -> float:
    """Share of pairs whose chosen answer the model finds more likely than the rejected one."""
    c, r = sequence_logps(model, collator, rows, batch_size)
    return float((c > r).float().mean())


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO loss (Rafailov et al. 2023, eq. 7) per pair, written out: -log σ(β((πc - rc) - (πr - rr)))."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * margin)


__all__ = ["CogDPOTrainer", "PreferenceCollator", "dpo_sigmoid_loss", "encode_pair", "encode_pairs",
           "pair_conversations", "preference_accuracy", "sequence_logps"]
