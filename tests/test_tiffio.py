"""TIFF metadata: the pixel size the resolution tags (or ImageJ's unit) give, in metres, or none."""

from pathlib import Path

import numpy as np
import pytest

from stemd.apps.tiffio import TiffImage, pixel_size_from_tags
from stemd.errors import InputError


def _tags(resolution, unit, imagej=None) -> TiffImage:
    return TiffImage(path=Path("x.tif"), shape=(64, 64), dtype=np.dtype(np.uint16), axes="YX", imagej=imagej,
                     shaped=None, description=None, resolution=resolution, resolution_unit=unit)


@pytest.mark.parametrize(("resolution", "unit", "imagej", "metres"), [
    ((2.56e8, 2.56e8), 3, None, 3.90625e-11),  # per centimetre
    ((0.0254 / 3.9e-11,) * 2, 2, None, 3.9e-11),  # per inch
    ((2.5e7, 2.5e7), 4, None, 4e-11),  # per millimetre (tifffile's extension)
    ((2.5e4, 2.5e4), 5, None, 4e-11),  # per micrometre (tifffile's extension)
    ((25.6, 25.6), 1, {"unit": "nm"}, 3.90625e-11),  # ImageJ: no TIFF unit, its own
    ((25600.0, 25600.0), 1, {"unit": "micron"}, 3.90625e-11),
    ((25600.0, 25600.0), 1, {"unit": "\\u00B5m"}, 3.90625e-11),  # ImageJ writes µ escaped
    ((0.256, 0.256), 1, {"unit": "Å"}, 3.90625e-10),
    ((72.0, 72.0), 2, None, None),  # a print resolution, not a microscope's pixel
    ((25.6, 25.6), 1, None, None),  # no unit
    ((25.6, 25.6), 1, {"unit": "pixel"}, None),
    (None, None, None, None),
])
def test_pixel_size_from_tags(resolution, unit, imagej, metres):
    got = pixel_size_from_tags(_tags(resolution, unit, imagej))
    assert (got is None) if metres is None else got == pytest.approx(metres, rel=1e-9)


def test_non_square_pixels_are_named():
    with pytest.raises(InputError, match="non-square pixels.*--pixel-size"):
        pixel_size_from_tags(_tags((25.6, 30.0), 1, {"unit": "nm"}))
