"""Preference pairs on the kit's side, without TRL: encoding, collation, scoring, and the file checks.

Kept apart from `finetune/dpo.py` (the TRL trainer and the run) so that `cogtune validate` and the tests
that only encode or score pairs do not import TRL (several seconds).

* `encode_pair` / `PreferenceCollator`: a pair as TRL's preference batch, encoded by the kit's own
  processor (`CogVLMProcessor.encode`; why, in `finetune/dpo.py`'s docstring).
* `sequence_logps` / `preference_accuracy`: summed answer log-probabilities from full logits, independent of
  TRL's fused head, so tests and the proof can check TRL's numbers against them.
* `check_pair_file` / `pair_token_report`: `cogtune validate` for files of preference rows: every problem at
  once as `file:line`, then token lengths of prompt+chosen and prompt+rejected against `--max-length`.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_formats.schema import Conversation, Message, Problem

from .models.cogvlm.processing import IGNORE_INDEX, CogVLMCollator, CogVLMProcessor, EncodedExample, RowTooLong

if TYPE_CHECKING:
    from data_formats.preference import PreferencePair


def pair_conversations(pair: PreferencePair) -> tuple[Conversation, Conversation]:
    """(prompt + chosen, prompt + rejected) as two ordinary conversations."""
    p = pair.prompt
    turns = [Message(m.role, m.content) for m in p.messages]
    chosen = Conversation(p.id, list(p.images), turns + [Message("assistant", pair.chosen)], p.source)
    rejected = Conversation(p.id, list(p.images), [Message(m.role, m.content) for m in p.messages]
                            + [Message("assistant", pair.rejected)], p.source)
    return chosen, rejected


def _without_first_turns(conv: Conversation, k: int) -> Conversation:
    """`conv` minus its first k user/assistant turns (system turns kept), as `encode_conversation` drops them."""
    systems = [m for m in conv.messages if m.role == "system"]
    rest = [m for m in conv.messages if m.role != "system"]
    return Conversation(conv.id, list(conv.images), systems + rest[2 * k:], conv.source)


def encode_pair(pair: PreferencePair, processor: CogVLMProcessor) -> dict[str, Any]:
    """One pair -> a dataset row: chosen_/rejected_ input_ids, token_type_ids, labels, and the image refs.

    Both sides are encoded by the processor with `last_turn_only=True` (whatever it was built with): the
    labels (and so TRL's completion mask) cover the final answer and its EOS only. When the processor's
    `max_length` makes the longer side drop old turns, the other side drops as many, so that both answers
    follow the same prompt (DPO compares answers to one prompt). A side that does not fit at all raises
    `RowTooLong`.
    """
    if not processor.last_turn_only:
        processor = processor.with_settings(last_turn_only=True)
    sides = dict(zip(("chosen", "rejected"), pair_conversations(pair)))
    encoded = {side: processor.encode(conv) for side, conv in sides.items()}
    k = max(e.dropped_turns for e in encoded.values())
    for side, e in encoded.items():
        if e.dropped_turns < k:
            try:
                encoded[side] = processor.encode(_without_first_turns(sides[side], k))
                encoded[side].dropped_turns = k
            except ValueError:  # interleaved images whose markers sit in the dropped turns: keep that side whole
                pass
    row: dict[str, Any] = {"id": pair.id}
    for side, e in encoded.items():
        row[f"{side}_input_ids"], row[f"{side}_token_type_ids"], row[f"{side}_labels"] = \
            e.input_ids, e.token_type_ids, e.labels
        row[f"{side}_dropped_turns"] = e.dropped_turns
        row["image_refs"] = [str(r) for r in e.images]
        for name, refs in e.extra.items():  # a family's per-example inputs (CogAgent: `cross_images`, picture refs)
            row[f"{side}_{name}"] = [str(r) for r in refs]
    return row


def encode_pairs(pairs: Sequence[PreferencePair], processor: CogVLMProcessor) -> list[dict[str, Any]]:
    """`encode_pair` for every pair (kept in order)."""
    return [encode_pair(p, processor) for p in pairs]


@dataclass
class PreferenceCollator:
    """Rows of `encode_pair` -> TRL's preference batch (chosen rows, then rejected rows) + Cog extras.

    Padding, token types and image loading are the kit's `CogVLMCollator`'s (right padding).
    """

    processor: CogVLMProcessor

    def __post_init__(self) -> None:
        from .generation import generation_input_names

        self._cog = CogVLMCollator(self.processor)
        self._extras = generation_input_names(self.processor.model_input_names)
        # a family's own per-example inputs (CogAgent: cross_images), stored per side by `encode_pair`
        own = {f.name for f in fields(EncodedExample)}
        self._family_inputs = [n for n in self.processor.example_input_names if n not in own]

    def _side(self, rows: Sequence[dict[str, Any]], side: str) -> list[dict[str, Any]]:
        return [{"input_ids": r[f"{side}_input_ids"], "token_type_ids": r[f"{side}_token_type_ids"],
                 "labels": r[f"{side}_labels"], "images": list(r["image_refs"]),
                 **{n: list(r[f"{side}_{n}"]) for n in self._family_inputs}} for r in rows]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._cog(self._side(rows, "chosen") + self._side(rows, "rejected"))  # (2B, L)
        out = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
        }
        for name in self._extras:  # token_type_ids, images, ...: TRL passes them to the model untouched
            if name not in out and batch.get(name) is not None:
                out[name] = batch[name]
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in rows[0]:
                out[key] = torch.tensor([float(r[key]) for r in rows])
        return out


@torch.no_grad()
def sequence_logps(model: torch.nn.Module, collator: PreferenceCollator, rows: Sequence[dict[str, Any]],
                   batch_size: int = 8, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected answers, computed from full logits.

    Independent of TRL's fused head on purpose: tests and the proof check TRL's numbers against it.
    `reference=True` disables the peft adapter(s) (the base model).
    """
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


# ---------------------------------------------------------------------------------------------
# Reading pairs for a run, and `cogtune validate` on a preference file
# ---------------------------------------------------------------------------------------------


def read_pairs_or_fail(path: str, cfg: Any, log=print) -> list:
    """Preference rows through `data_formats.preference` validation: every problem listed, or skipped rows
    counted with `data.skip_invalid`. Raises ValueError (no traceback for the user) otherwise."""
    from data_formats.preference import read_pairs

    pairs, problems = read_pairs(path, cfg.data.image_root, max_images=None if cfg.data.allow_multi_image else 1,
                                 check_images=True, allow_outside_images=cfg.data.allow_outside_images)
    errors = [p for p in problems if p.level == "error"]
    for w in (p for p in problems if p.level == "warning"):
        log(str(w))
    if errors and not cfg.data.skip_invalid:
        rows = len({e.source for e in errors})
        raise ValueError(f"{path}: {rows} preference row(s) have problems (fix them, or set data.skip_invalid: "
                         "true to skip them):\n" + "\n".join(f"  {e}" for e in errors))
    if errors:
        log(f"{path}: skipped {len({e.source for e in errors})} invalid preference row(s)")
    if not pairs:
        raise ValueError(f"{path}: no usable preference rows")
    return pairs


def check_pair_file(path: str | Path, *, image_root: str | Path | None = None, max_images: int | None = 1,
                    check_images: bool = True, allow_outside_images: bool = False) -> tuple[list, Any]:
    """Structural validation of a preference file (no tokenizer): the valid pairs and a `ValidationReport`."""
    from data_formats.preference import validate_pairs
    from data_formats.schema import read_jsonl_lines

    from .validate import ValidationReport

    path = Path(path)
    lines, bad_lines = read_jsonl_lines(path)
    if lines is None:
        return [], ValidationReport(str(path), 0, 0, bad_lines)
    pairs, problems = validate_pairs(lines, path=path, image_root=image_root, max_images=max_images,
                                     check_images=check_images, allow_outside_images=allow_outside_images)
    rows = sum(1 for line in lines if line.strip()) + len(bad_lines)
    return pairs, ValidationReport(str(path), rows, len(pairs), bad_lines + problems)


def _spread(values: list[int]) -> str:
    s = sorted(values)
    p95 = s[max(0, -(-95 * len(s) // 100) - 1)]
    return f"min {s[0]} / median {int(statistics.median(s))} / p95 {p95} / max {s[-1]}"


def pair_token_report(pairs: list, info: Any, max_length: int | None,
                      max_images: int | None) -> tuple[list[str], list[Problem]]:
    """Token lengths of prompt+chosen and prompt+rejected (image tokens included) against `max_length`.

    Problems: an error for a pair that cannot be encoded; a warning for a pair whose two sides would drop a
    different number of old turns at `max_length` (the longer answer loses history first): training then drops
    as many from the shorter side (`encode_pair`), so that history is lost although it would fit.
    """
    full = info.processor.with_settings(allow_multi_image=max_images is None or max_images > 1, max_length=None,
                                        last_turn_only=True)
    cut = full.with_settings(max_length=max_length)
    lengths: dict[str, list[int]] = {"chosen": [], "rejected": []}
    problems: list[Problem] = []
    truncated = dropped = uneven = 0
    for pair in pairs:
        sides = dict(zip(("chosen", "rejected"), pair_conversations(pair)))
        try:
            whole = {k: len(full.encode(c).input_ids) for k, c in sides.items()}
        except ValueError as exc:
            problems.append(Problem(pair.prompt.source, "row", f"cannot be encoded: {exc}", "", "error",
                                    "encode error"))
            continue
        for k, n in whole.items():
            lengths[k].append(n)
        if max_length is None or max(whole.values()) <= max_length:
            continue
        drops: dict[str, int] = {}
        for k, conv in sides.items():
            try:
                drops[k] = cut.encode(conv).dropped_turns
            except RowTooLong:
                drops[k] = -1
        if min(drops.values()) < 0:
            dropped += 1  # training skips a pair one of whose sides does not fit at all
            continue
        truncated += 1
        if drops["chosen"] != drops["rejected"]:
            uneven += 1
            problems.append(Problem(
                pair.prompt.source, "row", f"at max_length {max_length} prompt+chosen ({whole['chosen']} tokens) "
                f"drops {drops['chosen']} old turn(s) but prompt+rejected ({whole['rejected']} tokens) drops "
                f"{drops['rejected']}; training drops {max(drops.values())} from both, so that both answers follow "
                "the same prompt", "shorten the history or the longer answer, or raise data.max_length, to keep the "
                "history", "warning", "uneven truncation"))
    if not lengths["chosen"]:
        return ["token lengths: no valid pairs to measure"], problems
    lines = [f"token lengths ({len(lengths['chosen'])} pairs, image tokens included: {info.image_tokens} per image; "
             f"template '{info.template_version}'):",
             f"  prompt+chosen:   {_spread(lengths['chosen'])}",
             f"  prompt+rejected: {_spread(lengths['rejected'])}"]
    if max_length is not None:
        lines.append(f"at --max-length {max_length}: {truncated} pairs truncated (oldest history turns dropped), "
                     f"{uneven} of them unevenly (the longer answer would drop more turns; both sides drop as many), "
                     f"{dropped} pairs dropped entirely (a side's last turn alone does not fit)")
    return lines, problems


__all__ = ["PreferenceCollator", "check_pair_file", "dpo_sigmoid_loss", "encode_pair", "encode_pairs",
           "pair_conversations", "pair_token_report", "preference_accuracy", "read_pairs_or_fail", "sequence_logps"]
