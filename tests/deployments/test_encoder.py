"""The Encoder's batch contract, on the plain class with asyncio (no Ray cluster): every caller's batch
gets its own vectors, merged passes stay within the limits, and metrics count items and passes.

The module shares one Encoder and one event loop (the MergingBatcher's workers live on the loop).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np
import pydantic
import pytest
import skimage.data
from ray.serve import metrics

from deployments.autoscaling import ONGOING_ITEMS_METRIC
from deployments.encoder import Encoder, pass_threads
from index.model.embedder import ClipEmbedder
from index.model.imaging import prepare_for_model
from index.model.spec import resolve_model_spec

T = TypeVar("T")
SPEC = resolve_model_spec("tiny-random", device="cpu")
DEFAULT = {"max_batch_size": 8, "max_concurrent_batches": 1}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)  # batcher workers, if any are left
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending))
    loop.close()


@pytest.fixture(scope="module")
def encoder(loop: asyncio.AbstractEventLoop) -> Any:
    enc = Encoder.func_or_class(SPEC)
    enc.reconfigure(DEFAULT)
    return enc


@pytest.fixture(scope="module")
def reference() -> ClipEmbedder:
    """The same model outside the deployment: what each caller's vector must equal."""
    return ClipEmbedder.load(SPEC)


@pytest.fixture(scope="module")
def pixels() -> list[np.ndarray]:
    """Real photos of different sizes and shapes, prepared as the ingress prepares them."""
    from PIL import Image

    coffee = skimage.data.coffee()
    photos = [
        skimage.data.astronaut(),
        coffee,
        np.ascontiguousarray(coffee.transpose(1, 0, 2)),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        np.stack([skimage.data.camera()] * 3, axis=-1),
    ]
    return [prepare_for_model(Image.fromarray(p), SPEC.preprocess) for p in photos]


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    # A deadline, so that a lost answer fails the test instead of hanging it.
    return loop.run_until_complete(asyncio.wait_for(coro, 120))


async def one_image(encoder: Any, image: np.ndarray) -> np.ndarray:
    """A caller with a batch of one image (as an ingress with one request in flight sends it)."""
    return (await encoder.embed_image_batch(image[None]))[0]


async def one_text(encoder: Any, text: str) -> np.ndarray:
    return (await encoder.embed_text_batch([text]))[0]


def test_interleaved_concurrent_callers_each_get_their_own_vector(
    loop: asyncio.AbstractEventLoop, encoder: Any, reference: ClipEmbedder, pixels: list[np.ndarray]
) -> None:
    texts = ["a red car", "zwei Katzen", "", "x " * 300, "un perro", "日本語のテキスト", "a", "b"]
    calls: list[tuple[str, Any]] = []
    for i in range(24):  # images and texts interleaved, every image and text several times
        calls.append(("image", pixels[i % len(pixels)]) if i % 3 else ("text", texts[i % len(texts)]))
    before = encoder.info()["stats"]

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(
            *(one_image(encoder, x) if kind == "image" else one_text(encoder, x) for kind, x in calls)
        )

    vectors = run(loop, main())
    for (kind, x), got in zip(calls, vectors, strict=True):
        want = reference.encode_images(x[None])[0] if kind == "image" else reference.encode_texts([x])[0]
        assert got.shape == (SPEC.dim,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-5)
    after = encoder.info()["stats"]
    for kind in ("image", "text"):
        n = sum(k == kind for k, _ in calls)
        assert after[kind]["calls"] - before[kind]["calls"] == n
        assert after[kind]["items"] - before[kind]["items"] == n
        # they really were batched: fewer passes than callers
        assert after[kind]["batches"] - before[kind]["batches"] < n


def test_a_bad_input_fails_only_its_own_caller(
    loop: asyncio.AbstractEventLoop, encoder: Any, reference: ClipEmbedder, pixels: list[np.ndarray]
) -> None:
    wrong_size = np.zeros((32, 32, 3), np.uint8)
    wrong_dtype = pixels[0].astype(np.float32)

    async def main() -> list[Any]:
        return await asyncio.gather(
            one_image(encoder, pixels[0]),
            one_image(encoder, wrong_size),
            one_text(encoder, "fine"),
            one_image(encoder, wrong_dtype),
            one_text(encoder, b"bytes"),  # type: ignore[arg-type]
            one_image(encoder, pixels[1]),
            return_exceptions=True,
        )

    ok0, bad_size, text, bad_dtype, bad_text, ok1 = run(loop, main())
    np.testing.assert_allclose(ok0, reference.encode_images(pixels[0][None])[0], atol=2e-5)
    np.testing.assert_allclose(ok1, reference.encode_images(pixels[1][None])[0], atol=2e-5)
    np.testing.assert_allclose(text, reference.encode_texts(["fine"])[0], atol=2e-5)
    assert isinstance(bad_size, ValueError) and "(B, 64, 64, 3)" in str(bad_size)
    assert isinstance(bad_dtype, ValueError) and "float32" in str(bad_dtype)
    assert isinstance(bad_text, ValueError) and "bytes" in str(bad_text)


def test_reconfigure_reaches_the_batcher(loop: asyncio.AbstractEventLoop, encoder: Any) -> None:
    new = {"max_batch_size": 3, "max_concurrent_batches": 2}
    encoder.reconfigure(new)
    try:
        assert encoder.info()["batch"] == new
        assert (encoder.batcher.max_batch_size, encoder.batcher.max_concurrent) == (3, 2)

        async def main() -> list[np.ndarray]:
            return await asyncio.gather(*(one_text(encoder, f"t{i}") for i in range(10)))

        before = encoder.info()["stats"]["text"]["largest_batch"]
        run(loop, main())
        assert encoder.info()["stats"]["text"]["largest_batch"] <= max(3, before)
        with pytest.raises(pydantic.ValidationError, match="max_batch_sizes"):
            encoder.reconfigure({"max_batch_sizes": 4})  # a typo is refused, not ignored
        with pytest.raises(pydantic.ValidationError, match="max_concurrent_batches"):
            encoder.reconfigure({"max_concurrent_batches": 0})
        assert encoder.info()["batch"] == new  # the refused configs changed nothing
    finally:
        encoder.reconfigure(DEFAULT)


def test_concurrent_passes_share_the_replicas_cpu_threads(
    loop: asyncio.AbstractEventLoop, encoder: Any, pixels: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two passes at once on a CPU get half the replica's threads each, instead of oversubscribing it."""
    calls: list[int | None] = []
    real = encoder.embedder.encode_images

    def spy(batch: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        calls.append(threads)
        return real(batch, threads=threads)

    monkeypatch.setattr(encoder, "_cpu_threads", 4)  # as if Ray had given the replica num_cpus: 4
    monkeypatch.setattr(encoder.embedder, "encode_images", spy)
    try:
        for concurrent, expected in ((2, 2), (1, 4), (8, 1)):
            encoder.reconfigure({"max_batch_size": 8, "max_concurrent_batches": concurrent})
            assert encoder.info()["cpu_threads_per_pass"] == expected
            calls.clear()
            run(loop, one_image(encoder, pixels[0]))
            assert calls == [expected]
    finally:
        encoder.reconfigure(DEFAULT)


@pytest.mark.parametrize(
    ("cpu_threads", "concurrent", "expected"), [(None, 2, None), (2, 1, 2), (2, 2, 1), (6, 4, 1), (16, 2, 8)]
)
def test_pass_threads(cpu_threads: int | None, concurrent: int, expected: int | None) -> None:
    assert pass_threads(cpu_threads, concurrent) == expected


def test_metrics_count_every_request_and_pass(
    loop: asyncio.AbstractEventLoop, encoder: Any, pixels: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    observed: list[tuple[str, float, str]] = []
    gauges: dict[tuple[str, str], float] = {}

    # Serve's own metrics go through the same classes (with other tags): keep only ours.
    def observe(self: metrics.Histogram, value: float, tags: dict[str, str] | None = None) -> None:
        if self._name.startswith("image_search_"):
            observed.append((self._name, value, (tags or {})["kind"]))

    def set_gauge(self: metrics.Gauge, value: float, tags: dict[str, str] | None = None) -> None:
        if self._name.startswith("image_search_"):
            gauges[(self._name, (tags or {})["kind"])] = value

    monkeypatch.setattr(metrics.Histogram, "observe", observe)
    monkeypatch.setattr(metrics.Gauge, "set", set_gauge)

    async def main() -> None:
        await asyncio.gather(
            *(one_image(encoder, pixels[i % len(pixels)]) for i in range(11)),
            *(one_text(encoder, f"text {i}") for i in range(5)),
        )

    run(loop, main())
    for kind, n in (("image", 11), ("text", 5)):
        sizes = [v for name, v, k in observed if name == "image_search_encoder_batch_size" and k == kind]
        assert sum(sizes) == n and all(1 <= s <= 8 for s in sizes)
        forward = [v for name, v, k in observed if name == "image_search_encoder_forward_ms" and k == kind]
        assert len(forward) == len(sizes) and all(v >= 0 for v in forward)
        latency = [v for name, v, k in observed if name == "image_search_encoder_request_ms" and k == kind]
        assert len(latency) == n and all(v >= 0 for v in latency)
        # everything answered: nothing ongoing, nothing queued
        assert gauges[("image_search_encoder_ongoing_items", kind)] == 0
        assert gauges[("image_search_encoder_queue_depth", kind)] == 0


def test_queue_depth_counts_callers_not_yet_in_a_pass(
    loop: asyncio.AbstractEventLoop, encoder: Any, pixels: list[np.ndarray]
) -> None:
    async def main() -> tuple[int, int, int]:
        tasks = [asyncio.create_task(one_image(encoder, pixels[0])) for _ in range(5)]
        await asyncio.sleep(0)  # all five have arrived; the batcher's worker has not started a pass yet
        seen = (encoder.metrics.ongoing["image"], encoder.metrics.queue_depth("image"))
        await asyncio.gather(*tasks)
        return (*seen, encoder.metrics.queue_depth("image"))

    ongoing, queued, after = run(loop, main())
    assert (ongoing, queued, after) == (5, 5, 0)


def test_batch_calls_return_each_item_its_own_vector(
    loop: asyncio.AbstractEventLoop, encoder: Any, reference: ClipEmbedder, pixels: list[np.ndarray]
) -> None:
    """Batches from several callers (as ingress replicas and the importer send them) interleave."""
    texts = ["a cat", "a rocket", "coffee", "an astronaut"]

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(
            encoder.embed_image_batch(np.stack(pixels[:3])),
            encoder.embed_text_batch(texts[:2]),
            encoder.embed_face_batch(np.stack(pixels[3:])),
            encoder.embed_text_batch(texts[2:]),
            one_image(encoder, pixels[5]),
        )

    images, texts_a, faces, texts_b, single = run(loop, main())
    np.testing.assert_allclose(images, reference.encode_images(np.stack(pixels[:3])), atol=1e-5)
    np.testing.assert_allclose(faces, reference.encode_images(np.stack(pixels[3:])), atol=1e-5)
    np.testing.assert_allclose(np.vstack([texts_a, texts_b]), reference.encode_texts(texts), atol=1e-5)
    np.testing.assert_allclose(single, reference.encode_images(pixels[5][None])[0], atol=1e-5)


@pytest.mark.parametrize(
    ("method", "bad", "message"),
    [
        ("embed_text_batch", [], "non-empty list of str"),
        ("embed_text_batch", ["a", b"b"], "non-empty list of str"),
        ("embed_text_batch", "a text", "got str"),
        (
            "embed_face_batch",
            np.zeros((0, 64, 64, 3), np.uint8),
            "non-empty uint8 array of shape (B, 64, 64, 3)",
        ),
        ("embed_face_batch", np.zeros((2, 64, 64, 3), np.float32), "float32"),
        ("embed_image_batch", np.zeros((2, 32, 64, 3), np.uint8), "(2, 32, 64, 3)"),
    ],
)
def test_bad_batches_are_refused(
    loop: asyncio.AbstractEventLoop, encoder: Any, method: str, bad: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        run(loop, getattr(encoder, method)(bad))


def test_items_in_flight_are_counted_per_item_and_reported_for_autoscaling(
    loop: asyncio.AbstractEventLoop, encoder: Any, pixels: list[np.ndarray]
) -> None:
    async def main() -> tuple[dict[str, float], int, dict[str, float]]:
        calls = [
            asyncio.create_task(encoder.embed_image_batch(np.stack(pixels[:4]))),
            asyncio.create_task(encoder.embed_text_batch(["a", "b", "c"])),
            asyncio.create_task(one_image(encoder, pixels[0])),
        ]
        await asyncio.sleep(0)  # every call has arrived; none has been answered
        during = encoder.record_autoscaling_stats()
        queued = encoder.metrics.queue_depth("image") + encoder.metrics.queue_depth("text")
        await asyncio.gather(*calls)
        return during, queued, encoder.record_autoscaling_stats()

    during, queued, after = run(loop, main())
    assert during == {ONGOING_ITEMS_METRIC: 8.0}  # 4 images + 3 texts + 1 image, not 3 calls
    assert queued <= 8
    assert after == {ONGOING_ITEMS_METRIC: 0.0}
