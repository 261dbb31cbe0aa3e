"""benchmarks/gather_sectors.py: the lane mappings it models copy every tile element once, and its
sector counts are right where they can be worked out by hand."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gather_sectors  # noqa: E402


@pytest.mark.parametrize("mapping", gather_sectors.MAPPINGS)
@pytest.mark.parametrize("bn", [64, 128])
def test_b_mappings_copy_each_element_once(mapping, bn):
    lanes = gather_sectors.b_lanes(mapping, bn)
    assert lanes.shape == (gather_sectors.BK * bn // 32, 32, 2)
    cells = lanes.reshape(-1, 2)
    flat = cells[:, 0] * bn + cells[:, 1]
    assert sorted(flat.tolist()) == list(range(gather_sectors.BK * bn))


@pytest.mark.parametrize("bm", [32, 64, 128])
def test_a_mapping_copies_each_element_once(bm):
    cells = gather_sectors.a_lanes(bm).reshape(-1, 2)
    assert sorted((cells[:, 0] * bm + cells[:, 1]).tolist()) == list(range(gather_sectors.BK * bm))


def test_pixel_lanes_of_the_kernel():
    """The mapping the _px kernels compute: lane l of warp w, row l % 4 + 4 q, column 8 w + l / 4."""
    lanes = gather_sectors.b_lanes("pixels", 64)
    first = lanes[0]  # warp 0, q = 0
    assert first[:8].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1], [1, 1], [2, 1], [3, 1]]
    banks = (8 * lanes[..., 0] + lanes[..., 1]) % 32  # Bs row pitch 72 floats: 8 mod 32
    assert all(len(set(b.tolist())) == 32 for b in banks), "a bank conflict in the shared stores"


def test_sector_counts_by_hand():
    """A 1x1 convolution of 64 channels on 32x32 images: a warp's default B copy reads one pixel of
    32 channel planes (32 sectors); by pixel lanes 4 aligned consecutive pixels of 8 planes (8); the
    A copy 4 aligned pixels of 8 filter rows of dy (8)."""
    geom = gather_sectors.geometry(1, 64, 32, 32, 64, 1, 1, 1, 0)
    got = gather_sectors.wgrad_sectors(geom, 20, np.random.default_rng(1))
    assert got["tile"] == "64x64"
    assert (got["b columns"], got["b pixels"], got["a"]) == (32.0, 8.0, 8.0)
