"""The image processor saved next to every IVPT checkpoint (the test transform of docs/method.md#training-augmentation)."""

from transformers import BitImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


def make_image_processor(image_size: int = 518) -> BitImageProcessor:
    """RGB conversion, bilinear resize of the shorter side to `image_size`, centre crop, ImageNet normalisation."""
    return BitImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BILINEAR,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )
