"""CUB-sized synthetic JPEGs for the data-pipeline figures of bench_data.py and bench_gpu.py.

Its own module because bench_gpu.py runs on a GPU image that has torch, timm and transformers but not `datasets`,
which bench_data.py needs.
"""

import io

import numpy as np

from ivpt.data.synthetic import class_attributes, render_bird


def cub_sized_jpegs(count: int) -> list[bytes]:
    """JPEG bytes of 500 × 375 synthetic images (the typical CUB resolution)."""
    attributes = class_attributes(10, seed=0)
    out = []
    for index in range(count):
        bird = render_bird(attributes[index % 10], 500, np.random.default_rng([1, index]))
        buffer = io.BytesIO()
        bird.image.crop((0, 62, 500, 437)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out
