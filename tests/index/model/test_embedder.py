"""index.model.spec and index.model.embedder: model resolution, loading, and encoding (tiny random model).

Nothing here downloads weights: trained-weight paths are exercised with checkpoints written to tmp_path.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import save_file

from index.model.embedder import ClipEmbedder, ModelLoadError, replica_device, use_cpu_threads
from index.model.imaging import ImageLimits, decode_image, prepare_for_model
from index.model.spec import ModelSpec, PreprocessSpec, resolve_model_spec, tiny_random_dir

TINY_DIM = 64


def _random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def _reference_model(spec: ModelSpec) -> tuple[Any, Any, Any]:
    """open_clip's own model, eval transform and tokenizer for `spec`, built independently of ClipEmbedder."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(spec.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(spec.open_clip_name)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec.open_clip_name)


def _copy_tiny_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_random_dir() / "open_clip_config.json", directory / "open_clip_config.json")
    return directory


# --- resolve_model_spec ------------------------------------------------------------------------------


def test_tiny_random_spec_comes_from_the_bundled_local_dir_config(tiny_spec: ModelSpec) -> None:
    config = json.loads((tiny_random_dir() / "open_clip_config.json").read_text())
    assert tiny_spec.open_clip_name == f"local-dir:{tiny_random_dir()}"
    assert tiny_spec.pretrained == "random"
    assert tiny_spec.weights_source == "random"
    assert tiny_spec.random_weights is True
    assert tiny_spec.identity == "tiny-random/random-seed-0"
    assert tiny_spec.dim == config["model_cfg"]["embed_dim"] == TINY_DIM
    assert tiny_spec.preprocess.size == (64, 64)
    assert tiny_spec.preprocess.mean == tuple(config["preprocess_cfg"]["mean"])
    assert tiny_spec.preprocess.std == tuple(config["preprocess_cfg"]["std"])


def test_identity_records_the_seed() -> None:
    assert resolve_model_spec("tiny-random", seed=7).identity == "tiny-random/random-seed-7"
    assert resolve_model_spec("tiny-random", pretrained="random").identity == "tiny-random/random-seed-0"


@pytest.mark.parametrize(
    ("model", "typed_tag", "canonical_tag"),
    [
        ("ViT-B-32", "laion2b_s34b_b79k", "laion2b_s34b_b79k"),
        ("ViT-B-32", "LAION2B-S34B-B79K", "laion2b_s34b_b79k"),
        ("ViT-B-16-SigLIP-256", "webli", "webli"),
        ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k", "laion5b_s13b_b90k"),
    ],
)
def test_tag_spec_takes_preprocessing_from_open_clip(model: str, typed_tag: str, canonical_tag: str) -> None:
    spec = resolve_model_spec(model, pretrained=typed_tag)
    tag_cfg = open_clip.get_pretrained_cfg(model, canonical_tag)
    image_size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    assert spec.pretrained == canonical_tag
    assert spec.weights_source == "tag"
    assert spec.random_weights is False
    assert spec.identity == f"{model}/{canonical_tag}"
    assert spec.dim == open_clip.get_model_config(model)["embed_dim"]
    assert spec.preprocess.size == (image_size, image_size)
    assert spec.preprocess.mean == tuple(tag_cfg["mean"])
    assert spec.preprocess.std == tuple(tag_cfg["std"])
    assert spec.preprocess.resize_mode == tag_cfg["resize_mode"]
    assert spec.preprocess.interpolation == tag_cfg["interpolation"]


def test_random_init_of_a_real_architecture_is_explicit() -> None:
    spec = resolve_model_spec("ViT-B-32", pretrained="random", seed=3)
    assert spec.random_weights is True
    assert spec.identity == "ViT-B-32/random-seed-3"
    assert spec.preprocess.size == (224, 224)


def test_checkpoint_file_spec(tmp_path: Path) -> None:
    checkpoint = tmp_path / "my_clip.safetensors"
    checkpoint.write_bytes(b"0123456789")
    spec = resolve_model_spec("ViT-B-32", pretrained=str(checkpoint))
    assert spec.weights_source == "file"
    assert spec.pretrained == str(checkpoint.resolve())
    assert spec.identity == "ViT-B-32/file:my_clip.safetensors:10"
    assert spec.random_weights is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"model": "ViT-B-32"},
            "needs pretrained weights: set pretrained to one of its open_clip tags (openai",
        ),
        ({"model": "ViT-B-32", "pretrained": "no_such_tag"}, "known tags: openai, "),
        (
            {"model": "ViT-B-32", "pretrained": "/nonexistent/clip.safetensors"},
            "/nonexistent/clip.safetensors",
        ),
        ({"model": "ViT-B-32", "pretrained": "./missing.pt"}, "checkpoint file not found"),
        ({"model": "ViT-B/32", "pretrained": "openai"}, "Did you mean 'ViT-B-32'"),
        ({"model": "no-such-model", "pretrained": "openai"}, "open_clip.list_models()"),
        ({"model": "tiny-random", "pretrained": "openai"}, "only has random weights"),
        ({"model": "hf-hub:org/repo"}, "local-dir"),
        ({"model": "local-dir:"}, "needs a directory"),
        ({"model": "local-dir:/nonexistent/dir"}, "model directory not found"),
        ({"model": "tiny-random", "device": "gpu"}, "device must be"),
        ({"model": "tiny-random", "precision": "fp8"}, "precision must be"),
        ({"model": "tiny-random", "seed": -1}, "seed must be"),
        ({"model": "tiny-random", "seed": True}, "seed must be"),
        ({"model": ""}, "model must be"),
    ],
)
def test_resolve_errors_say_what_to_set(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        resolve_model_spec(**kwargs)
    assert message in str(caught.value)


def test_pretrained_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a directory"):
        resolve_model_spec("ViT-B-32", pretrained=str(tmp_path))


def test_local_dir_needs_exactly_one_checkpoint_or_explicit_random(tmp_path: Path) -> None:
    directory = _copy_tiny_config(tmp_path / "clip")
    with pytest.raises(ValueError, match="no checkpoint file"):
        resolve_model_spec(f"local-dir:{directory}")
    spec = resolve_model_spec(f"local-dir:{directory}", pretrained="random")
    assert spec.random_weights is True
    assert spec.identity == "local-dir:clip/random-seed-0"
    (directory / "a.safetensors").write_bytes(b"x")
    (directory / "b.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="2 checkpoint files"):
        resolve_model_spec(f"local-dir:{directory}")
    with pytest.raises(ValueError, match="leave pretrained unset"):
        resolve_model_spec(f"local-dir:{directory}", pretrained="openai")


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        (None, "open_clip_config.json"),
        ("{not json", "cannot read"),
        ('{"preprocess_cfg": {}}', "must hold"),
    ],
)
def test_local_dir_config_errors(tmp_path: Path, config_text: str | None, message: str) -> None:
    if config_text is not None:
        (tmp_path / "open_clip_config.json").write_text(config_text)
    with pytest.raises(ValueError, match=message):
        resolve_model_spec(f"local-dir:{tmp_path}", pretrained="random")


def test_preprocess_spec_validates() -> None:
    with pytest.raises(ValueError, match="resize_mode"):
        PreprocessSpec((64, 64), (0.5,) * 3, (0.5,) * 3, "bicubic", "stretch")
    with pytest.raises(ValueError, match="std"):
        PreprocessSpec((64, 64), (0.5,) * 3, (0.5, 0.0, 0.5), "bicubic", "shortest")
    assert PreprocessSpec.from_open_clip({"size": 32}).size == (32, 32)


# --- ClipEmbedder.load -------------------------------------------------------------------------------


def test_tiny_random_loads_and_reports_itself(tiny_embedder: ClipEmbedder) -> None:
    assert tiny_embedder.dim == TINY_DIM
    assert tiny_embedder.info == {
        "model": "tiny-random",
        "pretrained": "random",
        "identity": "tiny-random/random-seed-0",
        "dim": TINY_DIM,
        "device": "cpu",
        "precision": "fp32",
        "random_weights": True,
        "image_size": [64, 64],
        "cpu_threads": torch.get_num_threads(),
    }


def test_random_weights_are_announced_loudly(tiny_spec: ModelSpec, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="index.model.embedder"):
        ClipEmbedder.load(tiny_spec)
    assert any(
        r.levelno == logging.WARNING and "RANDOM WEIGHTS: search results are meaningless" in r.getMessage()
        for r in caplog.records
    )


def test_same_seed_gives_identical_vectors_and_other_seeds_differ(tiny_embedder: ClipEmbedder) -> None:
    images = _random_images(4)
    texts = ["a cat", "a dog"]
    again = ClipEmbedder.load(resolve_model_spec("tiny-random", device="cpu", seed=0))
    other = ClipEmbedder.load(resolve_model_spec("tiny-random", device="cpu", seed=1))
    np.testing.assert_array_equal(again.encode_images(images), tiny_embedder.encode_images(images))
    np.testing.assert_array_equal(again.encode_texts(texts), tiny_embedder.encode_texts(texts))
    assert not np.allclose(other.encode_images(images), tiny_embedder.encode_images(images), atol=1e-3)
    assert not np.allclose(other.encode_texts(texts), tiny_embedder.encode_texts(texts), atol=1e-3)


def test_loading_leaves_the_global_rng_alone(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    ClipEmbedder.load(tiny_spec)
    assert torch.equal(torch.rand(3), expected)


def test_corrupt_checkpoint_in_local_dir_raises_model_load_error(tmp_path: Path) -> None:
    directory = _copy_tiny_config(tmp_path / "broken")
    (directory / "open_clip_model.safetensors").write_bytes(b"this is not a safetensors file")
    spec = resolve_model_spec(f"local-dir:{directory}", device="cpu")
    assert spec.weights_source == "file" and spec.random_weights is False
    with pytest.raises(ModelLoadError) as caught:
        ClipEmbedder.load(spec)
    message = str(caught.value)
    for advice in (
        "network access",
        "cache_dir",
        "set `pretrained` to its local path",
        "model='tiny-random'",
    ):
        assert advice in message
    assert "open_clip_model.safetensors" in message


def test_corrupt_checkpoint_file_for_builtin_model_raises_model_load_error(tmp_path: Path) -> None:
    checkpoint = tmp_path / "vit.pt"
    checkpoint.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ModelLoadError, match="network access"):
        ClipEmbedder.load(resolve_model_spec("ViT-B-32", pretrained=str(checkpoint), device="cpu"))


def test_real_checkpoint_in_local_dir_loads_those_weights(tmp_path: Path, tiny_spec: ModelSpec) -> None:
    source = ClipEmbedder.load(resolve_model_spec("tiny-random", device="cpu", seed=5))
    reference, _, _ = _reference_model(resolve_model_spec("tiny-random", seed=5))
    directory = _copy_tiny_config(tmp_path / "trained")
    save_file(reference.state_dict(), str(directory / "open_clip_model.safetensors"))

    loaded = ClipEmbedder.load(resolve_model_spec(f"local-dir:{directory}", device="cpu"))
    assert loaded.info["random_weights"] is False
    assert loaded.info["identity"].startswith("local-dir:trained/file:open_clip_model.safetensors:")
    images = _random_images(3)
    np.testing.assert_array_equal(loaded.encode_images(images), source.encode_images(images))
    np.testing.assert_array_equal(loaded.encode_texts(["x", "y"]), source.encode_texts(["x", "y"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        ClipEmbedder.load(resolve_model_spec("tiny-random", device="cuda"))


@pytest.mark.parametrize(
    ("requested", "assigned", "cuda", "expected"),
    [
        ("auto", [], True, "cpu"),  # GPUs visible, none reserved: stay off them
        ("auto", ["0"], True, "auto"),  # a whole or fractional GPU was assigned
        ("auto", [], False, "auto"),  # a CPU machine: auto already means the CPU
        ("cuda", [], True, "cuda"),  # an explicit choice is kept
        ("cpu", ["0"], True, "cpu"),
    ],
)
def test_replica_device(requested: str, assigned: list[str], cuda: bool, expected: str) -> None:
    assert replica_device(requested, assigned, cuda) == expected


def test_a_hugging_face_text_tower_without_transformers_is_a_clear_load_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resolving the multilingual model works offline; loading it says which extra to install."""
    spec = resolve_model_spec("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k")
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "transformers" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match=r"'transformers' package: pip install 'image-search\[multi"):
        ClipEmbedder.load(spec)
    # open_clip's own tokenizer needs nothing extra
    ClipEmbedder.load(resolve_model_spec("tiny-random", device="cpu"))


# --- encoding ----------------------------------------------------------------------------------------


def test_image_vectors_are_unit_float32_rows(tiny_embedder: ClipEmbedder) -> None:
    vectors = tiny_embedder.encode_images(_random_images(5))
    assert vectors.shape == (5, TINY_DIM)
    assert vectors.dtype == np.float32
    assert vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batching_does_not_change_vectors(tiny_embedder: ClipEmbedder) -> None:
    images = _random_images(4)
    one_by_one = np.concatenate([tiny_embedder.encode_images(images[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(tiny_embedder.encode_images(images), one_by_one, atol=1e-5)


def test_read_only_and_non_contiguous_batches(tiny_embedder: ClipEmbedder) -> None:
    images = _random_images(2)
    expected = tiny_embedder.encode_images(images)
    read_only = images.copy()
    read_only.setflags(write=False)
    flipped = np.ascontiguousarray(images[:, :, ::-1])[:, :, ::-1]  # negative strides, same pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(tiny_embedder.encode_images(read_only), expected)
    np.testing.assert_allclose(tiny_embedder.encode_images(flipped), expected, atol=1e-6)


def test_threads_apply_to_the_calling_thread_only(tiny_embedder: ClipEmbedder) -> None:
    """Two passes in two threads may each take part of the cores without changing anyone else's count."""
    images, texts = _random_images(2), ["a cat", "a dog"]
    expected_images, expected_texts = tiny_embedder.encode_images(images), tiny_embedder.encode_texts(texts)
    main_threads = torch.get_num_threads()
    seen: dict[str, int] = {}

    def worker() -> None:
        torch.set_num_threads(max(2, main_threads))  # what a new thread may inherit
        got_images = tiny_embedder.encode_images(images, threads=1)
        seen["after_images"] = torch.get_num_threads()
        torch.set_num_threads(3)
        got_texts = tiny_embedder.encode_texts(texts, threads=1)
        seen["after_texts"] = torch.get_num_threads()
        # the thread count changes the arithmetic's order, not its result
        np.testing.assert_allclose(got_images, expected_images, atol=1e-5)
        np.testing.assert_allclose(got_texts, expected_texts, atol=1e-5)
        tiny_embedder.encode_images(images)  # threads=None keeps the thread's own setting
        seen["untouched"] = torch.get_num_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"after_images": 1, "after_texts": 1, "untouched": 1}
    assert torch.get_num_threads() == main_threads
    torch.set_num_threads(main_threads)  # what later new threads inherit


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(tiny_embedder: ClipEmbedder, threads: object) -> None:
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        tiny_embedder.encode_images(_random_images(1), threads=threads)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        use_cpu_threads(threads)  # type: ignore[arg-type]


def test_empty_batches(tiny_embedder: ClipEmbedder) -> None:
    images = tiny_embedder.encode_images(np.zeros((0, 64, 64, 3), dtype=np.uint8))
    texts = tiny_embedder.encode_texts([])
    for result in (images, texts):
        assert result.shape == (0, TINY_DIM)
        assert result.dtype == np.float32


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((1, 64, 64, 3), dtype=np.float32),
        np.zeros((1, 64, 64, 3), dtype=np.int64),
        np.zeros((64, 64, 3), dtype=np.uint8),
        np.zeros((1, 32, 32, 3), dtype=np.uint8),
        np.zeros((1, 64, 64, 4), dtype=np.uint8),
        np.zeros((1, 3, 64, 64), dtype=np.uint8),
        [[0]],
    ],
    ids=["float32", "int64", "no-batch-axis", "wrong-size", "rgba", "channels-first", "list"],
)
def test_bad_image_batches_are_refused(tiny_embedder: ClipEmbedder, batch: object) -> None:
    with pytest.raises(ValueError, match=r"uint8 array of shape \(B, 64, 64, 3\)"):
        tiny_embedder.encode_images(batch)  # type: ignore[arg-type]


@pytest.mark.parametrize("texts", ["a single string", ["ok", 3], None, ["ok", None]])
def test_bad_text_batches_are_refused(tiny_embedder: ClipEmbedder, texts: object) -> None:
    with pytest.raises(ValueError, match="list of str"):
        tiny_embedder.encode_texts(texts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["astronaut_square", "coffee_wide", "coffee_tall", "chelsea", "noise_small", "strip"]
)
def test_split_preprocessing_matches_open_clip(
    tiny_embedder: ClipEmbedder, tiny_spec: ModelSpec, photos: dict[str, np.ndarray], name: str
) -> None:
    """prepare_for_model (CPU, uint8) + encode_images (normalise on device) == open_clip's own pipeline."""
    model, preprocess, _ = _reference_model(tiny_spec)
    image = Image.fromarray(photos[name])
    with torch.inference_mode():
        expected = model.encode_image(preprocess(image).unsqueeze(0), normalize=True).numpy()
    ours = tiny_embedder.encode_images(prepare_for_model(image, tiny_spec.preprocess)[None])
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_texts_match_open_clip_and_are_distinct_unit_vectors(
    tiny_embedder: ClipEmbedder, tiny_spec: ModelSpec
) -> None:
    texts = [
        "a photo of a cat",
        "dog",
        "a very long description of a mountain lake at sunrise with mist over the water and pine trees",
        "Ein Hund läuft im Schnee",
        "猫の写真",
        "кошка на диване",
        "",
    ]
    vectors = tiny_embedder.encode_texts(texts)
    assert vectors.shape == (len(texts), TINY_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len(np.unique(vectors.round(5), axis=0)) == len(texts)

    model, _, tokenizer = _reference_model(tiny_spec)
    with torch.inference_mode():
        expected = model.encode_text(tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-4)


def test_text_longer_than_the_context_is_truncated(tiny_embedder: ClipEmbedder) -> None:
    long_text = " ".join(["word"] * 500)
    longer_text = " ".join(["word"] * 900)
    vectors = tiny_embedder.encode_texts([long_text, longer_text])
    assert vectors.shape == (2, TINY_DIM)
    # Both are cut to the same 77 tokens.
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_cpu(tiny_embedder: ClipEmbedder, precision: str) -> None:
    embedder = ClipEmbedder.load(resolve_model_spec("tiny-random", device="cpu", precision=precision))
    assert embedder.info["precision"] == precision
    images = _random_images(3)
    vectors = embedder.encode_images(images)
    text_vectors = embedder.encode_texts(["a cat", "a dog"])
    assert vectors.dtype == np.float32 and text_vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    cosines = (vectors * tiny_embedder.encode_images(images)).sum(axis=1)
    assert cosines.min() > 0.98


def test_warmup_runs(tiny_embedder: ClipEmbedder) -> None:
    tiny_embedder.warmup()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_device_uses_cuda_fp16_and_agrees_with_cpu(tiny_embedder: ClipEmbedder) -> None:
    embedder = ClipEmbedder.load(resolve_model_spec("tiny-random"))
    assert embedder.info["device"] == "cuda"
    assert embedder.info["precision"] == "fp16"
    images = _random_images(8)
    cosines = (embedder.encode_images(images) * tiny_embedder.encode_images(images)).sum(axis=1)
    assert cosines.min() > 0.99
    text_cosines = (embedder.encode_texts(["a", "b c"]) * tiny_embedder.encode_texts(["a", "b c"])).sum(
        axis=1
    )
    assert text_cosines.min() > 0.99


@pytest.mark.parametrize("draft", [False, True])
def test_jpeg_draft_decode_switch_against_open_clips_own_pipeline(
    tiny_embedder: ClipEmbedder, tiny_spec: ModelSpec, draft: bool
) -> None:
    """jpeg_draft_decode=False: the service's vector of a big JPEG is open_clip's (Image.open + convert +
    eval transform) to float tolerance; True: a reduced-scale decode, whose vector differs."""
    photo = Image.fromarray(skimage.data.astronaut()).resize((1536, 1536), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    model, preprocess, _ = _reference_model(tiny_spec)
    with torch.inference_mode():
        reference_image = Image.open(io.BytesIO(data)).convert("RGB")
        expected = model.encode_image(preprocess(reference_image).unsqueeze(0), normalize=True).numpy()
    limits = ImageLimits(jpeg_draft_decode=draft)
    decoded = decode_image(data, limits, min_side_hint=max(tiny_spec.preprocess.size))
    ours = tiny_embedder.encode_images(prepare_for_model(decoded, tiny_spec.preprocess)[None])
    if draft:
        assert decoded.size[0] < 1536
        assert np.abs(ours - expected).max() > 1e-4  # ten times the tolerance of the exact path
    else:
        assert decoded.size == (1536, 1536)
        np.testing.assert_allclose(ours, expected, atol=1e-5)
