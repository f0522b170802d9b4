"""Model-family presets as data: what differs between CogVLM, CogAgent and CogVLM2 checkpoints.

One table, no registry (docs/conventions.md §2). Each entry names the official checkpoint it describes;
the numbers come from its `config.json` (copies in ``tests/assets/reference/configs``) and docs/architecture.md.
Everything here is plain Python so that `cogtune check/config/--help` never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Token types (docs/architecture.md §6, §7). Every image placeholder, boi and eoi included, is VISION.
LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1

# CLIP normalisation used by every family's image transform (docs/architecture.md §13).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class FamilySpec:
    """What the kit needs to know about one released checkpoint, beyond its config.json."""

    name: str
    version: int  # 1 = CogVLM (Vicuna-7B), 2 = CogVLM2 (Llama-3-8B)
    hf_id: str  # official repository, for messages and docs only (nothing is downloaded)
    image_size: int
    patch_size: int
    template_version: str  # the config's default; a recipe may choose another
    templates: tuple[str, ...]
    tokenizer_note: str

    @property
    def image_tokens(self) -> int:
        """Length of one image's VISION span in the sequence, boi and eoi included (docs/architecture.md §5.7)."""
        return image_token_count(self.image_size, self.patch_size, downsample_conv=self.version == 2)


def image_token_count(image_size: int, patch_size: int, downsample_conv: bool) -> int:
    """(S/P)^2 + 2; with CogVLM2's 2x2 downsampling conv each side halves first: (S/P/2)^2 + 2."""
    grid = image_size // patch_size
    if downsample_conv:
        grid //= 2
    return grid * grid + 2


_COG1_TOKENIZER = (
    "CogVLM1 checkpoints ship no tokenizer; the official demos use the Vicuna-7B v1.5 tokenizer "
    "(lmsys/vicuna-7b-v1.5). Download it once and pass its folder as model.tokenizer_dir."
)
_COG2_TOKENIZER = "CogVLM2 checkpoints ship their Llama-3 tokenizer in the checkpoint folder."

FAMILIES: dict[str, FamilySpec] = {
    # https://huggingface.co/THUDM/cogvlm-chat-hf/blob/main/config.json
    "cogvlm-chat": FamilySpec("cogvlm-chat", 1, "THUDM/cogvlm-chat-hf", 490, 14, "chat", ("base", "chat", "vqa"),
                              _COG1_TOKENIZER),
    # https://huggingface.co/THUDM/cogvlm-base-490-hf/blob/main/config.json
    "cogvlm-base-490": FamilySpec("cogvlm-base-490", 1, "THUDM/cogvlm-base-490-hf", 490, 14, "base",
                                  ("base", "chat", "vqa"), _COG1_TOKENIZER),
    # https://huggingface.co/THUDM/cogvlm-base-224-hf (config not retrieved; 224 px from the name)
    "cogvlm-base-224": FamilySpec("cogvlm-base-224", 1, "THUDM/cogvlm-base-224-hf", 224, 14, "base",
                                  ("base", "chat", "vqa"), _COG1_TOKENIZER),
    # https://huggingface.co/THUDM/cogvlm-grounding-generalist-hf/blob/main/config.json
    "cogvlm-grounding-generalist": FamilySpec("cogvlm-grounding-generalist", 1, "THUDM/cogvlm-grounding-generalist-hf",
                                              490, 14, "base", ("base", "chat", "vqa"), _COG1_TOKENIZER),
    # https://huggingface.co/THUDM/cogvlm-grounding-base-hf/blob/main/config.json
    "cogvlm-grounding-base": FamilySpec("cogvlm-grounding-base", 1, "THUDM/cogvlm-grounding-base-hf", 490, 14, "base",
                                        ("base", "chat", "vqa"), _COG1_TOKENIZER),
    # https://huggingface.co/THUDM/cogagent-chat-hf/blob/main/config.json (224 px in the sequence; the 1120-px
    # cross image is not in the sequence)
    "cogagent-chat": FamilySpec("cogagent-chat", 1, "THUDM/cogagent-chat-hf", 224, 14, "chat",
                                ("base", "chat", "chat_old", "vqa"), _COG1_TOKENIZER),
    # https://huggingface.co/THUDM/cogagent-vqa-hf (config.json not retrieved; same architecture)
    "cogagent-vqa": FamilySpec("cogagent-vqa", 1, "THUDM/cogagent-vqa-hf", 224, 14, "vqa",
                               ("base", "chat", "chat_old", "vqa"), _COG1_TOKENIZER),
    # https://huggingface.co/THUDM/cogvlm2-llama3-chat-19B/blob/main/config.json
    "cogvlm2-llama3-chat-19b": FamilySpec("cogvlm2-llama3-chat-19b", 2, "THUDM/cogvlm2-llama3-chat-19B", 1344, 14,
                                          "chat", ("base", "chat", "vqa"), _COG2_TOKENIZER),
    # https://huggingface.co/THUDM/cogvlm2-llama3-chinese-chat-19B/blob/main/config.json
    "cogvlm2-llama3-chinese-chat-19b": FamilySpec("cogvlm2-llama3-chinese-chat-19b", 2,
                                                  "THUDM/cogvlm2-llama3-chinese-chat-19B", 1344, 14, "chat",
                                                  ("base", "chat", "vqa"), _COG2_TOKENIZER),
    # https://huggingface.co/THUDM/cogvlm2-video-llama3-chat/blob/main/config.json (no vision experts, §21)
    "cogvlm2-video-llama3-chat": FamilySpec("cogvlm2-video-llama3-chat", 2, "THUDM/cogvlm2-video-llama3-chat", 224,
                                            14, "chat", ("base", "chat", "vqa"), _COG2_TOKENIZER),
    "cogvlm2-video-llama3-base": FamilySpec("cogvlm2-video-llama3-base", 2, "THUDM/cogvlm2-video-llama3-base", 224,
                                            14, "base", ("base", "chat", "vqa"), _COG2_TOKENIZER),
    "cogvlm2-llama3-caption": FamilySpec("cogvlm2-llama3-caption", 2, "THUDM/cogvlm2-llama3-caption", 224, 14,
                                         "base", ("base", "chat", "vqa"), _COG2_TOKENIZER),
}


def get_family(name: str) -> FamilySpec:
    """Look a family up by name; unknown names fail with the nearest valid ones."""
    if name in FAMILIES:
        return FAMILIES[name]
    import difflib

    near = difflib.get_close_matches(name, list(FAMILIES), n=3, cutoff=0.3)
    hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    raise ValueError(f"unknown model family {name!r}.{hint} Known: {', '.join(FAMILIES)}")


def detect_families(version: int, image_tokens: int) -> list[str]:
    """Names of the presets whose architecture matches a config.json (version and image-span length)."""
    return [n for n, s in FAMILIES.items() if s.version == version and s.image_tokens == image_tokens]


def family_mismatch(name: str, version: int, image_tokens: int, where: str) -> str | None:
    """None when preset `name` fits a checkpoint; else one message saying what was detected and how to fix it."""
    spec = get_family(name)
    if spec.version == version and spec.image_tokens == image_tokens:
        return None
    found = detect_families(version, image_tokens)
    if found:
        detected = f"it looks like {' or '.join(repr(n) for n in found)}"
        fix = f"set model.family={found[0]} (or model.family=null to skip this check)"
    else:
        detected = "it matches no known family (a tiny `cogtune make-tiny` model or a custom one)"
        fix = "set model.family=null to skip this check"
    return (f"model.family {name!r} (CogVLM{spec.version}, {spec.image_tokens} image tokens) does not match "
            f"{where} (CogVLM{version}, {image_tokens} image tokens): {detected}. The recipe was written for "
            f"another checkpoint; if {where.rsplit('/config.json', 1)[0]} is the model you want, {fix}.")
