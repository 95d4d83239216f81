"""What detection costs per image, next to the whole-image path, measured side by side in one run.

    python bench/detection.py [--repeat 20]

For each image: decode (at the hint its mode uses) + ``ModePipeline.plan`` for general_search (the
whole image), item_search (saliency) and adaptive_search (Haar face + eyes, or the whole image). The
encoder is not included (it is the same single crop for every mode with the default detectors). Prints
milliseconds per image (median of the repeats) and the ratio to the general_search path; the machine's
load changes the milliseconds, the ratios much less. Single-threaded OpenCV, so the figure is one core's.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.detect.modes import ModePipeline
from index.model.imaging import ImageLimits, decode_image
from index.model.spec import resolve_model_spec
from tests.images import product, scene


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--model", default="ViT-B-32", help="whose preprocessing (size) to prepare for")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    spec = resolve_model_spec(args.model, pretrained="random", device="cpu")
    pipe = ModePipeline(spec.preprocess)
    limits = ImageLimits()
    big = cv2.resize(skimage.data.coffee(), (1600, 1067), interpolation=cv2.INTER_CUBIC)
    images = {
        "astronaut 512x512 (face)": jpeg(skimage.data.astronaut()),
        "rocket 640x427 (no face)": jpeg(skimage.data.rocket()),
        "packshot 800x800": jpeg(
            scene(cv2.resize(product(0), (300, 300)), "gradient", (250, 200), (800, 800))
        ),
        "coffee 1600x1067": jpeg(big),
    }
    modes = ("general_search", "item_search", "adaptive_search")
    print(f"model preprocessing: {args.model} {spec.preprocess.size}; {args.repeat} repeats; ms per image")
    print(f"{'image':28s} " + " ".join(f"{m:>16s}" for m in modes) + "   item/general  adaptive/general")
    for name, data in images.items():
        ms = {}
        for mode in modes:
            hint = pipe.decode_side_hint(mode)
            runs = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                img = decode_image(data, limits, min_side_hint=hint)
                pipe.plan(img, mode, query=False)
                runs.append((time.perf_counter() - t) * 1000)
            ms[mode] = statistics.median(runs)
        item, adaptive = (ms[m] / ms["general_search"] for m in modes[1:])
        ratios = f"{item:12.1f}x {adaptive:16.1f}x"
        print(f"{name:28s} " + " ".join(f"{ms[m]:16.1f}" for m in modes) + "   " + ratios)


if __name__ == "__main__":
    main()
