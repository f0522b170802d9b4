"""Tokenizers: a tiny offline one for tests and tiny checkpoints, and loading a real one with checks.

The tiny tokenizer exists so tests, `cogtune make-tiny` and the CPU demo never download anything.
It is a byte-level BPE trained in-process on a small embedded English corpus; it reproduces the
special-token names and id conventions of the real tokenizers (Vicuna for CogVLM1, Llama-3 for
CogVLM2) but not their vocabularies.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Target vocabulary size of the tiny tokenizers (specials included).
TINY_VOCAB_SIZE = 512

# Vicuna / Llama-2 conventions: ids 0..2 are the specials; <unk> doubles as pad and image placeholder.
V1_SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}
# Llama-3 names; in the real tokenizer they sit at 128000, 128001, 128002, 128009 (end of vocabulary).
V2_SPECIALS = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "pad": "<|reserved_special_token_0|>",
    "eot": "<|eot_id|>",
}

_COLOURS = "red green blue yellow purple orange white black pink brown gray grey".split()
_SHAPES = "circle square triangle rectangle star shape shapes dot dots".split()
_PLACES = "left right top bottom middle center centre corner upper lower side".split()
_SIZES = "large small big tiny medium".split()
_NUMBERS = "zero one two three four five six seven eight nine ten".split()

# Sentences in the style of the demo data set (colours, shapes, positions, sizes, counting) and the
# prompt templates (docs/architecture.md §14), so that those strings merge into few tokens.
_CORPUS_LINES = [
    "Question: What color is the shape? Answer: The shape is red.",
    "Question: What colour is the circle? Answer: The circle is blue.",
    "Question: What shape is in the image? Short answer: square",
    "Question: Where is the triangle? Answer: The triangle is on the left.",
    "Question: Is the square large or small? Answer: The square is small.",
    "Question: How many circles are there? Answer: There are 3 circles.",
    "Question: How many shapes are in the picture? Answer: There are two shapes.",
    "Question: Describe the image. Answer: A large green circle at the top right of a white background.",
    "Question: What is at the bottom left? Answer: A small yellow triangle.",
    "Question: What color is the background? Answer: The background is black.",
    "Describe this image in one sentence.",
    "What is in the picture? Where is it? What size is it?",
    "The picture shows a purple square in the middle and an orange star in the upper corner.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: [INST] [/INST] <EOI>Question: Short answer:",
    "yes no maybe, I do not know. It is not there.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 100 2024 3.14 (x, y) [1, 2] {a: b}",
]


def _corpus() -> list[str]:
    """Embedded training text: fixed lines plus generated colour/shape/position/size/count sentences."""
    lines = list(_CORPUS_LINES)
    for i, colour in enumerate(_COLOURS):
        shape = _SHAPES[i % len(_SHAPES)]
        place = _PLACES[i % len(_PLACES)]
        size = _SIZES[i % len(_SIZES)]
        num = _NUMBERS[i % len(_NUMBERS)]
        lines.append(f"Question: What color is the {shape}? Answer: The {shape} is {colour}.")
        lines.append(f"There is a {size} {colour} {shape} on the {place}. I count {num} ({i}) of them.")
        lines.append(f"{colour.capitalize()} {shape}s: {num}. Is it {size}? Yes, it is {size}.")
    words = _COLOURS + _SHAPES + _PLACES + _SIZES + _NUMBERS
    lines.append(" ".join(words))
    # Answers are tokenized on their own (no leading space, docs/architecture.md §15.2): teach the bare words too.
    lines.extend(words)
    return lines


def _train_bpe(vocab_size: int, leading_specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=leading_specials[0] if leading_specials else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=leading_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


@functools.lru_cache(maxsize=2)
def _tiny_tokenizer_json(version: int) -> str:
    """Serialized `tokenizers` JSON; cached because training takes ~0.1 s and tests call this often."""
    if version == 1:
        tok = _train_bpe(TINY_VOCAB_SIZE, [V1_SPECIALS["unk"], V1_SPECIALS["bos"], V1_SPECIALS["eos"]])
        bos = V1_SPECIALS["bos"]
    elif version == 2:
        specials = list(V2_SPECIALS.values())
        tok = _train_bpe(TINY_VOCAB_SIZE - len(specials), [])
        tok.add_special_tokens(specials)  # appended after the BPE vocabulary, as in Llama-3
        bos = V2_SPECIALS["bos"]
    else:
        raise ValueError(f"version must be 1 (CogVLM) or 2 (CogVLM2), got {version!r}")
    # Like the real tokenizers, add_special_tokens=True prepends BOS; the kit always passes False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok.to_str()


def build_tiny_tokenizer(version: int) -> PreTrainedTokenizerFast:
    """Offline, deterministic byte-level BPE (512 ids) with the real special-token names of `version`.

    v1: `<unk>`=0 (pad and image placeholder), `<s>`=1, `</s>`=2.
    v2: Llama-3 names at the end: `<|begin_of_text|>`=508, `<|end_of_text|>`=509,
    `<|reserved_special_token_0|>`=510 (pad and image placeholder), `<|eot_id|>`=511.
    """
    tok = Tokenizer.from_str(_tiny_tokenizer_json(version))
    if version == 1:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=V1_SPECIALS["bos"],
            eos_token=V1_SPECIALS["eos"],
            unk_token=V1_SPECIALS["unk"],
            pad_token=V1_SPECIALS["unk"],
            padding_side="right",
            clean_up_tokenization_spaces=False,
            model_max_length=4096,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=V2_SPECIALS["bos"],
        eos_token=V2_SPECIALS["eos"],
        pad_token=V2_SPECIALS["pad"],
        additional_special_tokens=[V2_SPECIALS["eot"]],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer files where they were looked for (typically a CogVLM1 checkpoint)."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

_VICUNA_HINT = (
    "CogVLM1 and CogAgent checkpoints ship no tokenizer: they use the Vicuna-7B v1.5 (Llama-2) tokenizer. "
    "Download it once, e.g. `huggingface-cli download lmsys/vicuna-7b-v1.5 tokenizer.model tokenizer_config.json "
    "special_tokens_map.json --local-dir ./vicuna-tokenizer`, and pass that folder: `model.tokenizer_dir=DIR` "
    "for train/check/targets (recipe key or override), `--tokenizer-dir DIR` for validate/predict/chat "
    "(merge/export read it from the run)."
)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _config_value(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def _read_config(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(
    model_dir: str | Path, tokenizer_dir: str | Path | None = None, config: Any = None
) -> PreTrainedTokenizerFast:
    """The checkpoint's tokenizer (or `tokenizer_dir`'s), with pad set and special ids checked against config.

    `config` is a CogVLMConfig or a config.json dict; read from `model_dir/config.json` when None.
    Raises TokenizerNotFoundError naming what to download for CogVLM1 checkpoints (they ship none),
    and ValueError when bos/eos/pad ids disagree with the config (an input mismatch would silently
    train on wrong special tokens).
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if config is None:
        config = _read_config(model_dir)
    if not folder.is_dir() or not _has_tokenizer(folder):
        where = f"{folder} (model.tokenizer_dir)" if tokenizer_dir is not None else f"the checkpoint folder {folder}"
        version = _config_value(config, "cogvlm_version")
        vocab = _config_value(config, "vocab_size")
        looks_v1 = version == 1 or (version is None and vocab is not None and vocab < 100_000)
        hint = _VICUNA_HINT if (looks_v1 or tokenizer_dir is None) else "Pass a folder with tokenizer.json."
        raise TokenizerNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {where}. {hint}")
    try:
        if (folder / "tokenizer.json").is_file():
            # Direct fast load: never consults config.json (whose model_type AutoTokenizer may not know).
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the folder and the fix
        raise TokenizerNotFoundError(
            f"could not load the tokenizer from {folder}: {type(e).__name__}: {e}. "
            "A folder with tokenizer.json loads without extra packages; a sentencepiece-only folder "
            "(tokenizer.model) needs `pip install sentencepiece protobuf`."
        ) from e

    pad_cfg = _config_value(config, "pad_token_id")
    if tokenizer.pad_token_id is None:
        if pad_cfg is not None:
            # CogVLM2's tokenizer declares no pad; the official code pads (and fills images) with 128002.
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad_cfg))
        elif tokenizer.unk_token_id is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ValueError(
                f"the tokenizer in {folder} has no pad token and no config pad_token_id was given; "
                "set pad_token_id in config.json"
            )
    check_special_ids(tokenizer, config)
    return tokenizer


def check_special_ids(tokenizer: PreTrainedTokenizerFast, config: Any) -> None:
    """Raise ValueError naming every bos/eos/pad id on which tokenizer and config.json disagree."""
    if config is None:
        return
    problems = []
    for name in ("bos", "eos", "pad"):
        cfg = _config_value(config, f"{name}_token_id")
        tok = getattr(tokenizer, f"{name}_token_id")
        if cfg is None or tok is None:
            continue
        cfg_ids = set(cfg) if isinstance(cfg, (list, tuple)) else {cfg}
        if tok not in cfg_ids:
            token = getattr(tokenizer, f"{name}_token")
            problems.append(f"{name}: tokenizer {token!r}={tok}, config.json {name}_token_id={cfg}")
    if problems:
        raise ValueError(
            "tokenizer and config.json disagree on special token ids (" + "; ".join(problems) + "). "
            "Use the tokenizer that belongs to this checkpoint (CogVLM1: Vicuna-7B v1.5; CogVLM2: the one "
            "shipped in the checkpoint folder)."
        )
