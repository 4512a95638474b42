"""Several images in one prompt, on the host (runtime/vision.py): each placeholder expanded for its own image in
order, more or fewer images than placeholders refused, and Gemma 3's bidirectional mask per image block."""

from __future__ import annotations

import numpy as np
import pytest

from tpugraph.errors import UsageError
from tpugraph.runtime.vision import PromptImage, VisionConfig, expand_image_tokens, rope_index

QWEN = VisionConfig(patches=64, patch_dim=1176, tokens=16, max_pixels=112 * 112, patch_size=14, spatial_merge_size=2,
                    window_size=56, token_ids={"image": 7, "start": 5, "end": 6})
GEMMA = VisionConfig(patches=64, patch_dim=0, tokens=16, max_pixels=64 * 64, patch_size=8, spatial_merge_size=4,
                     window_size=0, token_ids={"image": 7, "start": 5, "end": 6}, kind="gemma3", placeholder="start",
                     bidirectional=True, mrope=False)


def test_each_placeholder_takes_its_own_image_in_order():
    ids = expand_image_tokens([9, 5, 7, 6, 10, 5, 7, 6, 11], QWEN, [(1, 4, 4), (1, 2, 4)])
    assert ids == [9, 5] + [7] * 4 + [6, 10, 5] + [7] * 2 + [6, 11]
    assert expand_image_tokens([9], QWEN, [(1, 2, 2), (1, 2, 2)]) == [5, 7, 6, 5, 7, 6, 9]  # none: all in front
    gemma = expand_image_tokens([9, 5, 10, 5], GEMMA, [(1, 8, 8), (1, 8, 8)])
    assert gemma == [9, 5] + [7] * 4 + [6, 10, 5] + [7] * 4 + [6]


@pytest.mark.parametrize("ids,grids", [([5, 7, 6], [(1, 2, 2), (1, 2, 2)]), ([5, 7, 6, 5, 7, 6], [(1, 2, 2)])])
def test_images_and_placeholders_that_differ_are_refused(ids, grids):
    with pytest.raises(UsageError, match=f"placeholder\\(s\\) for {len(grids)} image"):
        expand_image_tokens(ids, QWEN, grids)


def test_rope_index_goes_on_after_each_image():
    positions, delta = rope_index([3, 7, 7, 7, 7, 4, 7, 7, 8], 7, [(1, 4, 4), (1, 2, 4)], 2)
    assert positions[:, 1:5].tolist() == [[1] * 4, [1, 1, 2, 2], [1, 2, 1, 2]]  # a 2x2 grid from position 1
    assert positions[:, 5].tolist() == [3] * 3 and positions[:, 6:8].tolist() == [[4, 4], [4, 4], [4, 5]]
    assert positions[:, 8].tolist() == [6] * 3 and delta == 7 - 9


def test_each_gemma_block_sees_itself_both_ways_and_no_later_block():
    rows = np.array([1, 2, 5, 6, 7])
    image = PromptImage(np.zeros((5, 4)), rows, np.arange(9)[None], 0, bidirectional=True)
    assert [b.tolist() for b in image.blocks] == [[1, 2], [5, 6, 7]]
    causal = np.triu(np.full((1, 1, 9, 9), -1e4), 1)
    mask = image.attend(causal)[0, 0]
    assert mask[1, 2] == 0 and mask[5, 7] == 0  # within a block: both ways
    assert mask[2, 5] == -1e4 and mask[1, 6] == -1e4  # an earlier image never sees a later one
    assert (mask[5:8, 1:3] == 0).all()  # a later image sees the earlier one causally
