"""Frozen-vision feature cache (`data.feature_cache: DIR`): each image's vision features are computed once.

When LoRA leaves the vision tower frozen (almost every recipe), its output for an image never changes during a
run, yet a plain run recomputes it every epoch and in every evaluation; for CogVLM2 that is ~4.4B parameters
over 9,217 patches per image. With a cache the tower (and the GLU adapter, when it is frozen too) runs once per
image; later epochs, evaluation and later runs on the same base read the features from disk.

Keys. A file's name is the sha256 of the image's transformed pixels (dtype, shape and bytes): it covers the
picture's content and the preprocessing (resize, normalisation, image size) at once, and nothing else can give
the same pixels. The folder holding the files is named by a hash of what produced the features: the base
checkpoint's weight fingerprint and config hash, the vision config, the cached stage and the dtype; another
base, another dtype or a trained GLU never reads a stale file. Files are safetensors, written atomically.

Stages. `glu`: the GLU adapter's output (N, P, H), when the tower and the GLU are frozen. `tower`: the tower's
output after the optional 2x2 conv (N, P, D), when the GLU adapter is trained (`modules_to_save: glu_adapter`
or LoRA on it); the GLU then runs live. A LoRA on the tower itself makes features change, so it is refused.
boi/eoi are always applied live (they may be trained), and so is CogAgent's `model.vision.pos_embed` (part of
the tower's `project`). CogVLM2-Video's frames are images of the same tower: each frame is cached alone.
`cross`: CogAgent's high-resolution cross tower (EVA-L) output (N, P', C) when it is frozen, in a folder of
its own; its `pos_embed` runs live. When the cross tower trains (the `cross_tower` preset) it runs live.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .fileio import write_atomic

FORMAT = 1


class FeatureCache:
    """Image features on disk, one safetensors file per image, under a folder keyed by what produced them."""

    def __init__(self, root: str | Path, producer: dict[str, Any], stage: str) -> None:
        if stage not in ("glu", "tower", "cross"):
            raise ValueError(f"feature cache stage must be 'glu', 'tower' or 'cross', got {stage!r}")
        self.stage = stage
        self.producer = {**producer, "stage": stage, "format": FORMAT}
        key = hashlib.sha256(json.dumps(self.producer, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(root) / f"{stage}-{key}"
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "producer.json"
        if not meta.is_file():
            write_atomic(meta, json.dumps(self.producer, indent=1, default=str))
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> str:
        """sha256 of one image's transformed pixels (3, S, S): content and preprocessing in one."""
        cpu = pixels.detach().to("cpu").contiguous()
        h = hashlib.sha256(f"{cpu.dtype}{tuple(cpu.shape)}".encode())
        h.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def lookup(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Features of `images` (N, 3, S, S): read the cached ones, compute (and store) the others, in order."""
        from safetensors.torch import load_file, save

        keys = [self.key(img) for img in images]
        found: dict[int, torch.Tensor] = {}
        for i, k in enumerate(keys):
            if self.path(k).is_file():
                found[i] = load_file(str(self.path(k)))["features"]
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                fresh = compute(images[missing])  # (M, P, D)
            for j, i in enumerate(missing):
                feats = fresh[j].detach().to("cpu").contiguous()
                write_atomic(self.path(keys[i]), save({"features": feats}))
                found[i] = feats
        ref = next(iter(found.values()))
        device = images.device
        return torch.stack([found[i] for i in range(len(keys))]).to(device=device, dtype=ref.dtype)  # (N, P, D)

    def stats(self) -> str:
        files = list(self.dir.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        return (f"feature cache {self.dir}: {len(files)} images, {size / 2**20:.1f} MiB "
                f"({size / max(len(files), 1) / 2**20:.2f} MiB per image); this run: {self.hits} read, "
                f"{self.misses} computed")


def vision_module(model: Any) -> Any:
    """The vision tower module (EVA2CLIPModel) under a PeftModel or a bare model."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return base.model.vision


def cross_module(model: Any) -> Any | None:
    """CogAgent's cross tower (CrossVisionModel) under a PeftModel or a bare model; None for other families."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return getattr(base.model, "cross_vision", None)


def cache_stage(vision: Any) -> str:
    """'glu' when the tower and the GLU adapter are frozen, 'tower' when only the tower is; else an error."""
    trained = [n for n, p in vision.named_parameters() if p.requires_grad and not n.startswith(("boi", "eoi"))]
    tower = [n for n in trained if not n.startswith(vision.projection_prefixes)]  # CogAgent: + pos_embed
    if tower:
        raise ValueError(f"data.feature_cache needs a frozen vision tower, but this recipe trains {tower[0]} "
                         f"(and {len(tower) - 1} more): drop the vision_tower LoRA target or data.feature_cache")
    return "tower" if trained else "glu"


def attach(model: Any, root: str | Path, checkpoint_dir: str | Path,
           log: Callable[[str], None] = print) -> FeatureCache:
    """Give the model's vision module a feature cache under `root` (after LoRA is applied: it reads what trains)."""
    from .loading import base_fingerprint
    from .run_folder import config_hash

    vision = vision_module(model)
    stage = cache_stage(vision)
    param = next(vision.parameters())
    producer = {"base_fingerprint": base_fingerprint(checkpoint_dir), "config_hash": config_hash(checkpoint_dir),
                "vision_config": vision.vision_config, "dtype": str(param.dtype)}
    cache = FeatureCache(root, producer, stage)
    vision.feature_cache = cache
    log(f"data.feature_cache: {'tower + GLU' if stage == 'glu' else 'tower (the GLU adapter trains)'} features "
        f"cached in {cache.dir}")
    return cache


def attach_cross(model: Any, root: str | Path, checkpoint_dir: str | Path,
                 log: Callable[[str], None] = print) -> FeatureCache | None:
    """Cache CogAgent's cross-tower features too when that tower is frozen; None otherwise (it then runs live)."""
    from .loading import base_fingerprint
    from .run_folder import config_hash

    cross = cross_module(model)
    if cross is None:
        return None
    trained = [n for n, p in cross.vit.named_parameters() if p.requires_grad]
    if trained:
        log(f"data.feature_cache: the cross tower trains ({trained[0]} and {len(trained) - 1} more): it runs live")
        return None
    param = next(cross.parameters())
    config = model.config
    producer = {"base_fingerprint": base_fingerprint(checkpoint_dir), "config_hash": config_hash(checkpoint_dir),
                "cross_vision_config": config.cross_vision_config, "cross_image_size": config.cross_image_size,
                "dtype": str(param.dtype)}
    cache = FeatureCache(root, producer, "cross")
    cross.feature_cache = cache
    log(f"data.feature_cache: cross tower features cached in {cache.dir}")
    return cache


def dataset_image_refs(dataset: Any) -> list[Any]:
    """Every image ref of an encoded training dataset (through the packing / skipping wrappers)."""
    while not hasattr(dataset, "encoded") and hasattr(dataset, "base"):
        dataset = dataset.base
    return [ref for refs in dataset.encoded["images"] for ref in refs or []]


def precompute(cache: FeatureCache, vision: Any, refs: list[Any], transform: Callable[[Any], torch.Tensor],
               batch_size: int = 8) -> int:
    """Fill the cache for every distinct image ref before training; returns how many images were computed.

    A video ref transforms to its (T, 3, S, S) frames: each frame is an image of the same tower, cached alone."""
    seen: set[str] = set()
    todo = []
    for ref in refs:
        name = str(ref)
        if name not in seen:
            seen.add(name)
            todo.append(ref)
    if cache.stage == "cross":  # `vision` is CogAgent's CrossVisionModel, `transform` its cross-image transform
        param, compute = vision.vit.model.patch_embed.proj.weight, vision.encoder_features
    else:
        param = vision.patch_embedding.proj.weight
        compute = vision.glu_features if cache.stage == "glu" else vision.tower_features
    before = cache.misses
    for i in range(0, len(todo), batch_size):
        pixels = [transform(r) for r in todo[i:i + batch_size]]
        pixels = torch.cat([p if p.dim() == 4 else p[None] for p in pixels]).to(param.device, param.dtype)
        cache.lookup(pixels, compute)
    return cache.misses - before


def release_tower(vision: Any, stage: str) -> int:
    """Drop the weights the cache replaces (tower; GLU too at stage 'glu'): they never reach the accelerator.

    Called once every image of the run is cached. The parameters keep their names and dtype with no storage, so
    moving the model to a device costs nothing for them; a later cache miss is an error that says so.
    Returns the number of elements released.
    """
    if stage == "cross":
        parts = [vision.vit]
    else:
        parts = [vision.patch_embedding, vision.transformer] + ([vision.conv] if hasattr(vision, "conv") else [])
    if stage == "glu":
        parts.append(vision.linear_proj)
    released = 0
    for part in parts:
        for p in part.parameters():
            released += p.numel()
            p.data = p.data.new_empty(0)
    vision.tower_released = True
    return released
