"""The CLIP model at run time: :meth:`ClipEmbedder.load` builds it from a :class:`ModelSpec`, and its
encode methods turn prepared ``uint8`` images and texts into L2-normalised float32 vectors.

Loading is the only place that touches weights or picks a device, and the only one that can fail for
want of weights (:class:`ModelLoadError`). Scaling and mean/std normalisation happen on the model's
device: the same arithmetic as open_clip's ``ToTensor`` + ``Normalize``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import open_clip
import torch

from index.model.spec import (
    LOCAL_DIR_PREFIX,
    ModelSpec,
    PreprocessSpec,
    missing_text_packages,
)

logger = logging.getLogger(__name__)

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


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        missing = missing_text_packages(spec)
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
                ``spec.preprocess.size``, RGB, as returned by ``index.model.imaging.prepare_for_model``.
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
                f"got {describe_input(batch)}"
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


def describe_input(value: Any) -> str:
    """``"uint8 array of shape (2, 64, 64, 3)"``, or the type's name: what an error message says was given."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
