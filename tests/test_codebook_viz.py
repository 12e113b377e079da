"""The codebook visualisation against a tokenizer whose assignment is known in closed form."""

import numpy as np

from vqkd_jax.evaluation import codebook_viz


def test_patches_are_those_of_their_code(tmp_path):
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (5, 16, 16, 3)).astype(np.uint8)
  # "Tokenizer": 4x4 cells of 4x4 pixels; the code of a cell is its mean red value // 64.
  cells = images.reshape(5, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  indices = (cells[..., 0].mean(axis=(-1, -2)) // 64).astype(np.int32)       # [5, 4, 4]
  by_code = codebook_viz.patches_by_code(images, indices, np.arange(4), per_code=100)
  assert sum(len(p) for p in by_code.values()) == 5 * 16
  for k, patches in by_code.items():
    assert patches.shape[1:] == (4, 4, 3)
    assert np.all(patches[..., 0].mean(axis=(1, 2)) // 64 == k)
  # The first patch of code k is the first cell in (image, row, column) order with that code.
  n, i, j = np.argwhere(indices == indices[0, 0, 0])[0]
  np.testing.assert_array_equal(by_code[int(indices[0, 0, 0])][0],
                                images[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4])
  codes = codebook_viz.choose_codes(indices, 8, 3)
  freq = np.bincount(indices.ravel(), minlength=8)
  assert len(codes) == min(3, np.count_nonzero(freq)) and np.all(freq[codes] > 0) and np.all(np.diff(freq[codes]) <= 0)
  grid = codebook_viz.codebook_grid(images, indices, 8, num_rows=3, per_code=6, upscale=1)
  assert grid.shape == (len(codes) * 5 + 1, 6 * 5 + 1, 3)
  path = codebook_viz.save_codebook_grids(str(tmp_path / "codes.png"), images,
                                          {"a": (indices, 8), "b": (indices[:, ::-1], 8)},
                                          num_rows=3, per_code=6, upscale=1)
  from PIL import Image
  assert Image.open(path).size == (2 * 31 + 16, len(codes) * 5 + 1)
