"""Is a row's image usable? One check shared by ``megatron-vr1 data check`` and the training stream.

``parse_row`` validates the row's fields but never opens the image, so a missing file, a file that is not an image
(or is cut short) or an image whose size disagrees with the row's width/height would only surface deep inside the
trainer, as a PIL traceback. ``check_image`` turns each of those into a ``RowError`` naming the file, the row and
the field, so ``data check`` reports it and ``LocalizationDataset`` skips or raises it like any other bad row
(``data.on_bad_row``). numpy + PIL only, like the rest of ``data``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from megatron_vr1.data.image import open_image
from megatron_vr1.data.schema import RowError, VisionR1Row

UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What decoding a broken image raises: PIL's UnidentifiedImageError and "image file is truncated" are OSErrors;
the byte cap is a ValueError; the other three come from damaged headers and oversized images."""


def check_image(row: VisionR1Row, file: str | Path, rownum: int) -> Image.Image:
    """Decode ``row.image`` fully and return it as RGB; raise RowError if it is missing, unreadable, or not
    ``row.width`` x ``row.height`` (the boxes and the model's input size are computed from those)."""
    try:
        image = open_image(row.image)
    except FileNotFoundError:
        raise RowError(file, rownum, "image", f"file {row.image} does not exist; fix the path (relative to the "
                                              f"rows file) or add the image") from None
    except UNREADABLE as e:
        raise RowError(file, rownum, "image", f"cannot decode the image {_name(row.image)} ({e}); replace the "
                                              f"corrupt or truncated file") from None
    if (image.width, image.height) != (row.width, row.height):
        raise RowError(file, rownum, "width", f"row says {row.width}x{row.height} but the image is "
                                              f"{image.width}x{image.height}; set width/height to the image's size")
    return image


def _name(image: Path | bytes) -> str:
    return str(image) if isinstance(image, Path) else f"<{len(image)} embedded bytes>"
