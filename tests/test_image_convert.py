"""The one image processor (pipelines/media/image_convert.py): both front ends share one decoding core, so a
container gives the same pixels through either; round trips return the caller's kind; errors name the argument."""

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lowlight.pipelines.media.image_convert import (
    postprocess_image,
    prepare_illumination,
    prepare_image,
    split_images,
    to_tensor_batch,
)

RNG = np.random.default_rng(7)
U8 = RNG.integers(0, 256, (21, 37, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(U8),
        Image.fromarray(U8).convert("L"),
        Image.fromarray(np.dstack([U8, U8[..., :1]])),
        Image.fromarray(U8.astype(np.uint16)[..., 0] * 257),
        U8,
        U8.astype(np.uint16) * 257,
        U8.astype(np.float32) / 255,
    ],
    ids=["rgb", "gray", "rgba", "pil16", "np_u8", "np_u16", "np_f32"],
)
def test_both_front_ends_decode_alike(image):
    batch, _ = to_tensor_batch(image)
    single, size = prepare_image(image, "image")
    assert size == (21, 37)
    torch.testing.assert_close(single, batch[0].contiguous(), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "image", [Image.fromarray(U8), U8, U8.astype(np.uint16) * 257, U8.astype(np.float64) / 255, torch.rand(2, 3, 5, 7)]
)
def test_to_tensor_batch_returns_the_callers_kind(image):
    tensor, restore = to_tensor_batch(image)
    back = restore(tensor)
    assert type(back) is type(image)
    if isinstance(image, Image.Image):
        assert back.mode == image.mode and np.array_equal(np.asarray(back), np.asarray(image))
    elif isinstance(image, np.ndarray):
        assert back.dtype == image.dtype and back.shape == image.shape
        np.testing.assert_allclose(back, image, atol=1e-6 if back.dtype.kind == "f" else 0)
    else:
        assert torch.equal(back, image)


def test_prepare_resizes_to_the_multiple_and_postprocess_back():
    tensor, size = prepare_image(Image.fromarray(U8), "image", multiple=8)
    assert tensor.shape == (3, 24, 40) and tensor.dtype == torch.float32 and size == (21, 37)
    assert postprocess_image(tensor, size, "pil").size == (37, 21)
    assert postprocess_image(tensor, size, "np").shape == (21, 37, 3)
    assert postprocess_image(tensor, size, "pt").shape == (3, 21, 37)
    # at the original size: the map is resized like a float image; at the prepared size it is taken as is
    assert prepare_illumination(np.ones((21, 37), np.float32), (24, 40), size, "illumination[0]").shape == (1, 24, 40)
    exact = torch.rand(24, 40)
    torch.testing.assert_close(prepare_illumination(exact, (24, 40), size, "illumination[0]")[0], exact)


def test_split_images_flattens_batches_and_lists():
    items = split_images([np.zeros((2, 4, 4, 3), np.uint8), torch.zeros(3, 4, 4), Image.new("RGB", (4, 4))])
    assert len(items) == 4


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: prepare_image(np.full((4, 4, 3), np.nan, np.float32), "image[1]"), ValueError, r"image\[1\]: .*NaN"),
        (lambda: prepare_image(np.full((4, 4, 3), 2.0, np.float32), "image[0]"), ValueError, r"image\[0\]: .*0\.\.1"),
        (lambda: prepare_image(np.zeros((4, 4), np.int32), "image[0]"), ValueError, r"image\[0\]: .*uint8, uint16"),
        (lambda: prepare_image("x", "image[0]"), TypeError, r"image\[0\]: expected a PIL image"),
        (lambda: prepare_illumination(np.zeros((3, 3)), (8, 8), (5, 5), "illumination[0]"), ValueError,
         r"illumination\[0\]: size \(3, 3\) matches neither"),
        (lambda: postprocess_image(torch.zeros(3, 8, 8), (8, 8), "jpg"), ValueError, "output_type"),
        (lambda: to_tensor_batch(torch.full((1, 3, 4, 4), float("inf"))), ValueError, "images: .*NaN or inf"),
        (lambda: to_tensor_batch(np.zeros((4, 4, 2))), ValueError, r"images: expected a numpy array"),
    ],
)
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
