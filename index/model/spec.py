"""Which model and weights to use, resolved from configuration without loading any weights.

:func:`resolve_model_spec` turns (model name, pretrained tag or file, device, precision) into a
:class:`ModelSpec`: the image size and normalisation the ingress must prepare images for, and the
identity a library records, known without holding a model.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

TINY_RANDOM = "tiny-random"
"""Model name of the bundled tiny config: random weights, for tests and the offline demo."""

RANDOM = "random"
"""The ``pretrained`` value that asks for a seeded random initialisation instead of trained weights."""

LOCAL_DIR_PREFIX = "local-dir:"
_HF_HUB_PREFIX = "hf-hub:"
_CONFIG_FILE = "open_clip_config.json"
# The files open_clip's local-dir loader looks for as a checkpoint.
_DIR_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth")
# Suffixes that mark a `pretrained` value as meant to be a file rather than a tag (for the error message).
_FILE_LIKE_SUFFIXES = (*_DIR_CHECKPOINT_SUFFIXES, ".pt", ".ckpt", ".npz", ".npy")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_RESIZE_MODES = ("shortest", "longest", "squash")
_MAX_SEED = 2**63 - 1

WeightsSource = Literal["tag", "file", "random"]


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image must be prepared for a model, as open_clip's eval transform does it.

    Attributes:
        size: ``(height, width)`` of the model input in pixels.
        mean: per-channel mean subtracted after scaling pixels to [0, 1] (RGB order).
        std: per-channel standard deviation divided by after subtracting ``mean``.
        interpolation: open_clip's interpolation name (``"bicubic"`` or ``"bilinear"``).
        resize_mode: open_clip's resize mode: ``"shortest"`` (resize the short side, center crop),
            ``"longest"`` (resize the long side, center pad) or ``"squash"`` (resize, ignore aspect).
        fill_color: grey level used for padding in ``"longest"`` mode.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str
    fill_color: int = 0

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(not isinstance(s, int) or s <= 0 for s in self.size):
            raise ValueError(f"size must be (height, width) of positive ints; got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB); got mean={self.mean!r}, std={self.std!r}")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must not contain 0; got {self.std!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"resize_mode must be one of {', '.join(_RESIZE_MODES)}; got {self.resize_mode!r}"
            )

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any]) -> PreprocessSpec:
        """Build a spec from an open_clip preprocess config dict.

        Args:
            cfg: a dict with any of open_clip's ``PreprocessCfg`` keys (as found in a model's
                ``preprocess_cfg``, a pretrained-tag config, or a local ``open_clip_config.json``);
                missing keys take open_clip's own defaults.

        Returns:
            The spec, with ``size`` as ``(height, width)`` and ``mean``/``std`` as 3-tuples.

        Raises:
            ValueError: if the config holds values the spec cannot represent.
        """
        merged = merge_preprocess_dict(PreprocessCfg(), dict(cfg))
        if merged.get("mode", "RGB") != "RGB":
            raise ValueError(f"only RGB models are supported; preprocess mode is {merged['mode']!r}")
        return cls(
            size=_pair(merged["size"]),
            mean=_triple(merged["mean"]),
            std=_triple(merged["std"]),
            interpolation=str(merged["interpolation"]),
            resize_mode=str(merged["resize_mode"]),
            fill_color=int(merged["fill_color"]),
        )

    def to_open_clip(self) -> PreprocessCfg:
        """Return the equivalent open_clip ``PreprocessCfg`` (for ``open_clip.image_transform_v2``)."""
        return PreprocessCfg(
            size=self.size,
            mode="RGB",
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
            resize_mode=self.resize_mode,
            fill_color=self.fill_color,
        )


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model choice: everything needed to load it, and to know what it will produce.

    Attributes:
        model: the user-facing name (``"tiny-random"``, ``"ViT-B-32"``, ``"local-dir:/path"``).
        open_clip_name: what is passed to open_clip (built-in name or ``local-dir:<absolute dir>``).
        pretrained: an open_clip pretrained tag, the absolute path of a checkpoint file, or ``"random"``.
        weights_source: ``"tag"``, ``"file"`` or ``"random"``: how ``pretrained`` is to be read.
        cache_dir: where downloaded weights are cached (``None``: open_clip's default cache).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; resolved by :meth:`ClipEmbedder.load`.
        precision: ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        seed: seed of the random initialisation, so every replica and restart gets identical weights.
        preprocess: how images must be prepared for this model.
        random_weights: True when the weights are random (search results are then meaningless).
        identity: short string that names model and weights, recorded by libraries, e.g.
            ``"ViT-B-32/laion2b_s34b_b79k"`` or ``"tiny-random/random-seed-0"``.
        dim: dimension of the output vectors.
    """

    model: str
    open_clip_name: str
    pretrained: str
    weights_source: WeightsSource
    cache_dir: str | None
    device: str
    precision: str
    seed: int
    preprocess: PreprocessSpec
    random_weights: bool
    identity: str
    dim: int


def tiny_random_dir() -> Path:
    """Return the directory of the bundled ``tiny-random`` open_clip config."""
    return Path(__file__).resolve().parent / "model_configs" / TINY_RANDOM


def resolve_model_spec(
    model: str,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
) -> ModelSpec:
    """Check a model choice and describe it, without loading any weights.

    Args:
        model: ``"tiny-random"`` (bundled tiny config, random weights), one of open_clip's built-in
            architectures (``open_clip.list_models()``, e.g. ``"ViT-B-32"``), or
            ``"local-dir:/path"`` naming a directory with an ``open_clip_config.json`` and usually one
            checkpoint file.
        pretrained: for a built-in architecture: an open_clip pretrained tag for it
            (``open_clip.list_pretrained_tags_by_model(model)``), the path of a local checkpoint file,
            or ``"random"`` (explicit random init, for benchmarks); required. For ``"tiny-random"``:
            ``None`` or ``"random"``. For ``local-dir:``: ``None`` (use the checkpoint in the directory)
            or ``"random"``.
        cache_dir: directory where downloaded weights are cached; ``None`` for open_clip's default.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        seed: seed for random initialisation (ignored for trained weights).

    Returns:
        The resolved spec; its ``preprocess`` comes from open_clip's own config for the model and tag.

    Raises:
        ValueError: naming the bad value and what to set instead: unknown model, missing or unknown
            pretrained tag, missing checkpoint file, bad local directory, bad device/precision/seed.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string; got {model!r}")
    if pretrained is not None and (not isinstance(pretrained, str) or not pretrained):
        raise ValueError(f"pretrained must be None or a non-empty string; got {pretrained!r}")
    if not isinstance(device, str) or not _DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}; got {precision!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**63 - 1]; got {seed!r}")
    if cache_dir is not None:
        cache_dir = str(Path(cache_dir).expanduser())

    common = {"model": model, "cache_dir": cache_dir, "device": device, "precision": precision, "seed": seed}
    if model == TINY_RANDOM:
        if pretrained not in (None, RANDOM):
            raise ValueError(
                f"model 'tiny-random' only has random weights; leave pretrained unset or 'random' "
                f"(got {pretrained!r}); for trained weights pick a real model, e.g. model='ViT-B-32', "
                f"pretrained='laion2b_s34b_b79k'"
            )
        return _resolve_local_dir(tiny_random_dir(), RANDOM, TINY_RANDOM, common)
    if model.startswith(LOCAL_DIR_PREFIX):
        directory = model[len(LOCAL_DIR_PREFIX) :]
        if not directory:
            raise ValueError("model 'local-dir:' needs a directory path after the prefix")
        path = Path(directory).expanduser().resolve()
        return _resolve_local_dir(path, pretrained, f"{LOCAL_DIR_PREFIX}{path.name}", common)
    if model.startswith(_HF_HUB_PREFIX):
        raise ValueError(
            f"model {model!r}: 'hf-hub:' models are not supported because their config must be fetched "
            f"from the network; download the repository and use model='local-dir:<its directory>'"
        )
    return _resolve_builtin(model, pretrained, common)


def _resolve_builtin(model: str, pretrained: str | None, common: dict[str, Any]) -> ModelSpec:
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        raise _unknown_model(model)
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained is None:
        raise ValueError(
            f"model {model!r} needs pretrained weights: set pretrained to one of its open_clip tags "
            f"({_tag_list(tags)}), to the path of a local checkpoint file, or to 'random' for random "
            f"weights (benchmarks only)"
        )
    if pretrained == RANDOM:
        return _spec(
            open_clip_name=model,
            pretrained=RANDOM,
            weights_source="random",
            preprocess=_preprocess_from(model_cfg),
            identity=f"{model}/random-seed-{common['seed']}",
            dim=int(model_cfg["embed_dim"]),
            **common,
        )
    tag = _match_tag(pretrained, tags)
    if tag is not None:
        return _spec(
            open_clip_name=model,
            pretrained=tag,
            weights_source="tag",
            preprocess=_preprocess_from(model_cfg, open_clip.get_pretrained_cfg(model, tag)),
            identity=f"{model}/{tag}",
            dim=int(model_cfg["embed_dim"]),
            **common,
        )
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise _not_a_checkpoint(model, pretrained, path, tags)
    path = path.resolve()
    # open_clip gives a checkpoint file its default preprocessing (no tag to take it from).
    return _spec(
        open_clip_name=model,
        pretrained=str(path),
        weights_source="file",
        preprocess=_preprocess_from(model_cfg),
        identity=f"{model}/{_file_identity(path)}",
        dim=int(model_cfg["embed_dim"]),
        **common,
    )


def _unknown_model(model: str) -> ValueError:
    close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"unknown model {model!r}: not one of open_clip's built-in architectures "
        f"(list them with `python -c 'import open_clip; print(open_clip.list_models())'`), "
        f"not 'tiny-random', and not 'local-dir:/path'.{hint}"
    )


def _not_a_checkpoint(model: str, pretrained: str, path: Path, tags: Sequence[str]) -> ValueError:
    """Why ``pretrained``, neither a tag of ``model`` nor a file, cannot be used."""
    if path.is_dir():
        return ValueError(
            f"pretrained {pretrained!r} is a directory; set pretrained to the checkpoint file in it, or "
            f"use model='local-dir:{path}' if it holds an open_clip_config.json"
        )
    if _looks_like_path(pretrained):
        return ValueError(f"checkpoint file not found: {str(path)!r} (from pretrained={pretrained!r})")
    return ValueError(
        f"unknown pretrained tag {pretrained!r} for model {model!r}; known tags: {_tag_list(tags)}; "
        f"or give the path of a local checkpoint file, or 'random'"
    )


def _resolve_local_dir(
    directory: Path, pretrained: str | None, model_key: str, common: dict[str, Any]
) -> ModelSpec:
    config = _read_local_config(directory)
    model_cfg = config["model_cfg"]
    preprocess = _preprocess_from(model_cfg, config.get("preprocess_cfg", {}))
    open_clip_name = f"{LOCAL_DIR_PREFIX}{directory}"
    dim = int(model_cfg["embed_dim"])
    if pretrained == RANDOM:
        return _spec(
            open_clip_name=open_clip_name,
            pretrained=RANDOM,
            weights_source="random",
            preprocess=preprocess,
            identity=f"{model_key}/random-seed-{common['seed']}",
            dim=dim,
            **common,
        )
    if pretrained is not None:
        raise ValueError(
            f"model {common['model']!r} takes its weights from the checkpoint file in {str(directory)!r}; "
            f"leave pretrained unset, or set it to 'random' (got {pretrained!r})"
        )
    checkpoints = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix in _DIR_CHECKPOINT_SUFFIXES
    )
    if not checkpoints:
        raise ValueError(
            f"no checkpoint file ({', '.join('*' + s for s in _DIR_CHECKPOINT_SUFFIXES)}) in "
            f"{str(directory)!r}: put the model's open_clip_model.safetensors there, or set "
            f"pretrained='random' for random weights"
        )
    if len(checkpoints) > 1:
        # open_clip would pick one by its own preference order; an explicit single file is less surprising.
        raise ValueError(
            f"{len(checkpoints)} checkpoint files in {str(directory)!r} "
            f"({', '.join(p.name for p in checkpoints)}); keep exactly one"
        )
    return _spec(
        open_clip_name=open_clip_name,
        pretrained=str(checkpoints[0]),
        weights_source="file",
        preprocess=preprocess,
        identity=f"{model_key}/{_file_identity(checkpoints[0])}",
        dim=dim,
        **common,
    )


def missing_text_packages(spec: ModelSpec) -> str | None:
    """Why ``spec``'s model cannot be built here for want of an optional package, or ``None``.

    Models with a Hugging Face text tower or tokenizer (the multilingual ``xlm-roberta-base-ViT-B-32``,
    SigLIP) build them with ``transformers``, an optional extra of this project.
    """
    if spec.open_clip_name.startswith(LOCAL_DIR_PREFIX):
        model_cfg = _read_local_config(Path(spec.open_clip_name[len(LOCAL_DIR_PREFIX) :]))["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(spec.open_clip_name) or {}
    text_cfg = model_cfg.get("text_cfg", {})
    hf_names = [text_cfg[k] for k in ("hf_model_name", "hf_tokenizer_name") if text_cfg.get(k)]
    if not hf_names or importlib.util.find_spec("transformers") is not None:
        return None
    return (
        f"model {spec.model!r} uses a Hugging Face text tower or tokenizer ({hf_names[0]}) and needs the "
        f"'transformers' package: pip install 'image-search[multilingual]'. Its text config and tokenizer "
        f"files are downloaded from the Hugging Face hub on first start "
        f"(docs/operations.md: Multilingual text)"
    )


def _spec(**fields: Any) -> ModelSpec:
    return ModelSpec(random_weights=fields["weights_source"] == "random", **fields)


def _read_local_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ValueError(f"model directory not found: {str(directory)!r}")
    config_path = directory / _CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{str(config_path)!r} not found: a local-dir model needs an {_CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {str(config_path)!r}: {exc}") from exc
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not all(
        k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
    ):
        raise ValueError(
            f"{str(config_path)!r} must hold {{'model_cfg': {{'embed_dim', 'vision_cfg', 'text_cfg', ...}}, "
            f"'preprocess_cfg': {{...}}}}"
        )
    return config


def _preprocess_from(model_cfg: Mapping[str, Any], *overlays: Mapping[str, Any]) -> PreprocessSpec:
    """Merge preprocess settings the way open_clip's ``create_model`` does.

    open_clip starts from ``PreprocessCfg()`` defaults, overlays the pretrained tag's (or local config's)
    settings, then takes the size from the built vision tower, which gets it from ``vision_cfg``.
    """
    cfg: dict[str, Any] = asdict(PreprocessCfg())
    for overlay in overlays:
        cfg = merge_preprocess_dict(cfg, dict(overlay))
    image_size = model_cfg.get("vision_cfg", {}).get("image_size")
    if image_size is not None:
        cfg["size"] = image_size
    return PreprocessSpec.from_open_clip(cfg)


def _match_tag(pretrained: str, tags: Sequence[str]) -> str | None:
    # open_clip normalises tags this way (case, '-' vs '_'); return the registry's spelling so that the
    # identity recorded by a library does not depend on how the tag was typed.
    wanted = pretrained.lower().replace("-", "_")
    return next((t for t in tags if t.lower().replace("-", "_") == wanted), None)


def _looks_like_path(value: str) -> bool:
    return (
        "/" in value or "\\" in value or value.startswith(("~", ".")) or value.endswith(_FILE_LIKE_SUFFIXES)
    )


def _file_identity(path: Path) -> str:
    # The file name and size rather than the full path: a library must still match after the checkpoint
    # moves, and the size separates most different checkpoints that share a file name.
    return f"file:{path.name}:{path.stat().st_size}"


def _tag_list(tags: Sequence[str]) -> str:
    return ", ".join(tags) if tags else "none: this architecture has no published weights in open_clip"


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def _triple(value: Any) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    a, b, c = value
    return (float(a), float(b), float(c))
