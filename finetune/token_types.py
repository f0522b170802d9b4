"""Token-type rules shared by the model and the collator: expert routing and position ids.

Both are ports of official behaviour (docs/architecture.md §7 and §8) and are pinned by golden tests. They live
apart from the model so the data side can build position ids without importing model code.
"""

from __future__ import annotations

import torch

from .families import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE


def get_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where a position is routed to the vision expert.

    Quirk (§7): a position uses the vision expert only if it AND the next position are VISION,
    so the eoi token (last of a run) goes to the language expert; the last column is always language.
    """
    mask = torch.zeros_like(token_type_ids, dtype=torch.bool)  # (B, L)
    mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return mask


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) long position ids by the official rule (§8).

    boi and eoi get their own ids, all interior patches of one image share one id, padding does not
    advance the counter. Example (one image of 4 patches): BOS=0, boi=1, patches=2, eoi=3, text=4, 5...
    """
    tt = token_type_ids.clone()  # (B, L)
    if attention_mask is not None:
        tt[attention_mask == 0] = -1
    is_vision = tt == VISION_TOKEN_TYPE
    prev_lang = torch.ones_like(is_vision)
    prev_lang[:, 1:] = tt[:, :-1] != VISION_TOKEN_TYPE
    next_lang = torch.ones_like(is_vision)
    next_lang[:, :-1] = tt[:, 1:] != VISION_TOKEN_TYPE
    # boi (run start) and eoi (run end) are re-typed LANGUAGE so each gets its own position.
    tt[is_vision & (prev_lang | next_lang)] = LANGUAGE_TOKEN_TYPE
    step = torch.zeros_like(tt)
    step[:, 1:] = ((tt[:, 1:] == LANGUAGE_TOKEN_TYPE)
                   | ((tt[:, 1:] == VISION_TOKEN_TYPE) & (tt[:, :-1] == LANGUAGE_TOKEN_TYPE))).long()
    return step.cumsum(dim=-1)
