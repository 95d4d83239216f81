"""The CLIP model wrapper: which model and weights to use, and turning pixels and text into unit vectors.

Two steps, kept apart on purpose:

* :func:`resolve_model_spec` turns configuration (model name, pretrained tag or file, device, precision)
  into a :class:`ModelSpec`. It is cheap and loads no weights, so the ingress can learn the image size
  and normalisation it must prepare images for, and a library can record which model built it, without
  holding a model.
* :meth:`ClipEmbedder.load` builds the open_clip model from a spec. It is the only place that touches
  weights, picks a device, or can fail because weights are unavailable (:class:`ModelLoadError`).

Images arrive at :meth:`ClipEmbedder.encode_images` already resized and cropped as compact ``uint8``
arrays (see ``index.imaging.prepare_for_model``); scaling and mean/std normalisation happen on the
model's device, which is the same arithmetic as open_clip's ``ToTensor`` + ``Normalize``.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

logger = logging.getLogger(__name__)

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
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_RESIZE_MODES = ("shortest", "longest", "squash")
_MAX_SEED = 2**63 - 1

WeightsSource = Literal["tag", "file", "random"]

_WHAT_TO_DO = (
    "To fix it, do one of: (1) give this machine network access to the model hub on first start; the "
    "weights are then cached in `cache_dir` and later starts need no network; (2) download the checkpoint "
    "on another machine and set `pretrained` to its local path (or put it with its open_clip_config.json "
    "in a directory and use model='local-dir:<dir>'); (3) use model='tiny-random' for an offline demo with "
    "random weights (search results are then meaningless)."
)


class ModelLoadError(RuntimeError):
    """The model's weights could not be obtained or read.

    The message names the model, the weights asked for, the underlying cause, and what to do about it.
    The embedder never falls back to random weights on its own.
    """


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
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {model!r}: not one of open_clip's built-in architectures "
            f"(list them with `python -c 'import open_clip; print(open_clip.list_models())'`), "
            f"not 'tiny-random', and not 'local-dir:/path'.{hint}"
        )
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
    if path.is_file():
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
    if path.is_dir():
        raise ValueError(
            f"pretrained {pretrained!r} is a directory; set pretrained to the checkpoint file in it, or "
            f"use model='local-dir:{path}' if it holds an open_clip_config.json"
        )
    if _looks_like_path(pretrained):
        raise ValueError(f"checkpoint file not found: {str(path)!r} (from pretrained={pretrained!r})")
    raise ValueError(
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


def _missing_text_packages(spec: ModelSpec) -> str | None:
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
        f"files are downloaded from the Hugging Face hub on first start (README: Multilingual text)"
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


class ClipEmbedder:
    """An open_clip model ready to encode image and text batches into L2-normalised float32 vectors.

    Build it with :meth:`load`. The encode methods are safe to call from several threads at once (the
    forward passes are independent; tokenisation is serialised because Hugging Face fast tokenizers are
    not re-entrant).
    """

    def __init__(
        self,
        spec: ModelSpec,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        precision: str,
    ) -> None:
        """Wrap an already built model; use :meth:`load` instead of calling this directly.

        Args:
            spec: the spec the model was built from.
            model: the open_clip model, in eval mode, on ``device``, in ``precision``.
            tokenizer: ``open_clip.get_tokenizer(spec.open_clip_name)``.
            device: the device the model lives on.
            precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        """
        self._spec = spec
        # CLIP, CustomTextCLIP or CoCa: all have encode_image / encode_text, which nn.Module does not declare.
        self._model: Any = model
        self._tokenizer = tokenizer
        self._device = device
        self._precision = precision
        self._dtype = _DTYPES[precision]
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(spec.preprocess.mean, dtype=torch.float32, device=device).view(shape)
        self._std = torch.tensor(spec.preprocess.std, dtype=torch.float32, device=device).view(shape)
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(cls, spec: ModelSpec) -> ClipEmbedder:
        """Build the model described by ``spec``: obtain weights, pick the device, set eval mode.

        Trained weights come from open_clip (downloaded into ``spec.cache_dir`` on first use when given
        as a tag) or from the local checkpoint file. Random weights are initialised from ``spec.seed``
        without changing the process's global RNG state, so every replica and restart agrees.

        Args:
            spec: from :func:`resolve_model_spec`.

        Returns:
            The ready embedder.

        Raises:
            ModelLoadError: when the weights cannot be obtained or read (offline with no cached copy,
                corrupt or mismatched checkpoint, missing tokenizer files); the message says what to do.
            RuntimeError: when the requested device is not available, or open_clip built the model with
                a preprocessing config other than the one in ``spec``.
        """
        missing = _missing_text_packages(spec)
        if missing is not None:
            raise ModelLoadError(missing)
        device = _pick_device(spec.device)
        precision = _pick_precision(spec.precision, device)
        try:
            model = _create_model(spec, device, precision)
            tokenizer = open_clip.get_tokenizer(spec.open_clip_name, cache_dir=spec.cache_dir)
        except Exception as exc:  # open_clip, torch, safetensors, HF hub all raise their own types
            raise ModelLoadError(
                f"could not load model {spec.model!r} with pretrained={spec.pretrained!r}: "
                f"{type(exc).__name__}: {exc}. {_WHAT_TO_DO}"
            ) from exc
        model.eval()
        built = PreprocessSpec.from_open_clip(open_clip.get_model_preprocess_cfg(model))
        if built != spec.preprocess:
            # The spec's numbers are what images are normalised with; a mismatch would silently skew
            # every vector, so refuse.
            raise RuntimeError(
                f"open_clip built {spec.model!r} with preprocessing {built}, but the spec says "
                f"{spec.preprocess}"
            )
        embedder = cls(spec, model, tokenizer, device, precision)
        if spec.random_weights:
            logger.warning(
                "RANDOM WEIGHTS: search results are meaningless. Model %r (%s) was initialised randomly "
                "with seed %d; set a real model and pretrained weights for actual search.",
                spec.model,
                spec.identity,
                spec.seed,
            )
        else:
            logger.info("loaded %s on %s (%s), dim %d", spec.identity, device, precision, spec.dim)
        return embedder

    @property
    def spec(self) -> ModelSpec:
        """The spec this embedder was loaded from."""
        return self._spec

    @property
    def dim(self) -> int:
        """Dimension of the output vectors."""
        return self._spec.dim

    @property
    def info(self) -> dict[str, Any]:
        """What is loaded, for logs, ``/health`` and library records (a fresh dict each call)."""
        return {
            "model": self._spec.model,
            "pretrained": self._spec.pretrained,
            "identity": self._spec.identity,
            "dim": self._spec.dim,
            "device": str(self._device),
            "precision": self._precision,
            "random_weights": self._spec.random_weights,
            "image_size": list(self._spec.preprocess.size),
            # Intra-op threads of CPU forward passes (Ray sets OMP_NUM_THREADS from a replica's num_cpus).
            "cpu_threads": torch.get_num_threads(),
        }

    def encode_images(self, batch: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        """Encode prepared images.

        Args:
            batch: ``uint8`` array of shape ``(B, height, width, 3)`` with ``(height, width)`` equal to
                ``spec.preprocess.size``, RGB, as returned by ``index.imaging.prepare_for_model``.
                ``B`` may be 0.
            threads: on a CPU, the intra-op threads of this forward pass (see :func:`use_cpu_threads`);
                ``None`` keeps the calling thread's setting. Ignored on a GPU.

        Returns:
            ``float32`` array of shape ``(B, dim)``, each row L2-normalised.

        Raises:
            ValueError: if ``batch`` is not a ``uint8`` array of the expected shape.
        """
        height, width = self._spec.preprocess.size
        if (
            not isinstance(batch, np.ndarray)
            or batch.dtype != np.uint8
            or batch.ndim != 4
            or batch.shape[1:] != (height, width, 3)
        ):
            raise ValueError(
                f"encode_images expects a uint8 array of shape (B, {height}, {width}, 3); "
                f"got {_describe(batch)}"
            )
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not batch.flags.writeable or any(stride < 0 for stride in batch.strides):
            # torch.from_numpy warns on read-only arrays (Ray's object store hands those out) and refuses
            # negative strides (flipped views); the copy is small next to the forward pass.
            batch = np.array(batch, order="C")
        self._use_threads(threads)
        with torch.inference_mode():
            # Ship uint8 (a quarter of float32's bytes), then do ToTensor + Normalize on the device.
            pixels = torch.from_numpy(batch).to(self._device)
            pixels = pixels.permute(0, 3, 1, 2).to(dtype=torch.float32, memory_format=torch.contiguous_format)
            pixels = pixels.div_(255.0).sub_(self._mean).div_(self._std).to(self._dtype)
            features = self._model.encode_image(pixels)
            return _unit_rows(features)

    def encode_texts(self, texts: Sequence[str], *, threads: int | None = None) -> np.ndarray:
        """Encode texts with the model's own tokenizer; texts past the context length are truncated.

        Args:
            texts: a list (or tuple) of strings; may be empty.
            threads: as in :meth:`encode_images`.

        Returns:
            ``float32`` array of shape ``(len(texts), dim)``, each row L2-normalised.

        Raises:
            ValueError: if ``texts`` is not a list/tuple of ``str``.
        """
        if not isinstance(texts, list | tuple):
            raise ValueError(f"encode_texts expects a list of str; got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"encode_texts expects a list of str; texts[{i}] is {type(text).__name__}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._tokenizer_lock:
            tokens = self._tokenizer(list(texts))
        self._use_threads(threads)
        with torch.inference_mode():
            features = self._model.encode_text(tokens.to(self._device))
            return _unit_rows(features)

    def _use_threads(self, threads: int | None) -> None:
        if threads is None:
            return
        if self._device.type == "cpu":
            use_cpu_threads(threads)
        else:
            _check_threads(threads)  # a bad value should not wait for a CPU replica to fail

    def warmup(self) -> None:
        """Run one small image batch and one text batch, so the first real request pays no set-up cost."""
        height, width = self._spec.preprocess.size
        self.encode_images(np.zeros((2, height, width, 3), dtype=np.uint8))
        self.encode_texts(["warm-up", "a photo of a cat"])

    def __repr__(self) -> str:
        device, precision = str(self._device), self._precision
        return f"ClipEmbedder({self._spec.identity!r}, device={device!r}, precision={precision!r})"


def use_cpu_threads(threads: int) -> None:
    """Give the CPU forward passes of the calling thread ``threads`` intra-op threads.

    PyTorch's OpenMP thread count belongs to the calling thread (a new thread starts from the last
    value set anywhere), so two passes running in two threads can each use part of the cores: on a
    busy CPU, two single-threaded passes beat one two-threaded pass (no OpenMP barrier waiting on a
    descheduled thread, no spinning). Setting it is cheap, and skipped when it is already right.

    Raises:
        ValueError: when ``threads`` is not an int >= 1.
    """
    _check_threads(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _check_threads(threads: Any) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1; got {threads!r}")


def _create_model(spec: ModelSpec, device: torch.device, precision: str) -> torch.nn.Module:
    # pretrained_text=False: without it open_clip fetches a Hugging Face text tower's base weights from
    # the network whenever no full checkpoint is loaded (random init), which the full checkpoint would
    # overwrite anyway.
    options: dict[str, Any] = {
        "precision": precision,
        "device": device,
        "cache_dir": spec.cache_dir,
        "pretrained_text": False,
    }
    if spec.weights_source == "random":
        # open_clip initialises the weights on the CPU and only then moves the model, so the CPU
        # generator is the only one involved: fork only it (forking CUDA would initialise every GPU just
        # to snapshot its state), and seed only it (torch.manual_seed would also reseed every CUDA
        # generator, which fork_rng(devices=[]) would not restore).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(spec.seed)
            return open_clip.create_model(spec.open_clip_name, load_weights=False, **options)
    if spec.weights_source == "tag":
        # Some tags (e.g. OpenAI's) were trained with QuickGELU; build the architecture to match them
        # rather than get the mismatch warning and degraded vectors.
        tag_cfg = open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained)
        return open_clip.create_model(
            spec.open_clip_name,
            pretrained=spec.pretrained,
            require_pretrained=True,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            **options,
        )
    # A checkpoint file: for local-dir models open_clip finds it in the directory (the spec checked it is
    # the only one there) and ignores `pretrained`.
    local_dir = spec.open_clip_name.startswith(LOCAL_DIR_PREFIX)
    return open_clip.create_model(
        spec.open_clip_name,
        pretrained=None if local_dir else spec.pretrained,
        require_pretrained=True,
        **options,
    )


def replica_device(requested: str, assigned_gpus: Sequence[str], cuda_available: bool) -> str:
    """The device a serving replica should ask for, given the GPUs its scheduler assigned it.

    Ray leaves every GPU of a node visible to a replica that asked for none, so ``"auto"`` alone would
    put a CPU replica's model on a GPU it never reserved (and that another replica may fill). ``"auto"``
    therefore means the CPU when GPUs are visible but none was assigned; explicit choices are kept.

    Args:
        requested: the configured device (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        assigned_gpus: the GPU ids assigned to this replica (``num_gpus`` > 0, fractions included).
        cuda_available: whether CUDA devices are visible to this process.

    Returns:
        ``"cpu"`` for an ``"auto"`` replica without an assigned GPU on a CUDA machine, else ``requested``.
    """
    if requested == "auto" and cuda_available and not assigned_gpus:
        return "cpu"
    return requested


def _pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={requested!r} but CUDA is not available here; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={requested!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device


def _pick_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return requested


def _unit_rows(features: torch.Tensor) -> np.ndarray:
    # Normalise in float32 even for fp16 models: squaring fp16 activations can overflow.
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
