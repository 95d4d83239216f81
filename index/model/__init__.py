"""The CLIP model and what feeds it: model resolution (no weights), the embedder (weights, device,
encode), image decoding and preparation, and the merging batcher the Encoder runs passes through.

    spec = resolve_model_spec("tiny-random", device="cpu")       # cheap: size, normalisation, identity
    image = decode_image(data, ImageLimits())                     # RGB PIL image; limits checked first
    pixels = prepare_for_model(image, spec.preprocess)            # uint8 (H, W, 3) at the model size
    vectors = ClipEmbedder.load(spec).encode_images(pixels[None])  # float32 (1, dim), unit rows
"""

from index.errors import ImageDecodeError, ImageTooLarge
from index.model.batching import MergingBatcher
from index.model.embedder import ClipEmbedder, ModelLoadError, replica_device
from index.model.imaging import ImageLimits, decode_base64, decode_image, prepare_for_model
from index.model.spec import TINY_RANDOM, ModelSpec, PreprocessSpec, resolve_model_spec

__all__ = [
    "TINY_RANDOM",
    "ClipEmbedder",
    "ImageDecodeError",
    "ImageLimits",
    "ImageTooLarge",
    "MergingBatcher",
    "ModelLoadError",
    "ModelSpec",
    "PreprocessSpec",
    "decode_base64",
    "decode_image",
    "prepare_for_model",
    "replica_device",
    "resolve_model_spec",
]
