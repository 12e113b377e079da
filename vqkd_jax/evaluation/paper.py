"""The paper's published numbers (reference/paper.md), for the demo's table to print beside its own.

TABLE_IMAGENET: the ImageNet-1k class-conditional table (codebook usage %, rFID, PPL, FID_AR,
FID_NAR). TABLE_T2I: the second setting's table (usage, rFID, PPL, FID_AR, FID_T2I). The paper has
no Cluster row in either table.
"""

from __future__ import annotations

TABLE_IMAGENET = {
    "VQGAN": dict(codebook_usage=4.9, rfid=5.09, ppl=116.75, fid_ar=24.11, fid_nar=20.03),
    "FSQ": dict(codebook_usage=100.0, rfid=4.96, ppl=791.56, fid_ar=40.17, fid_nar=29.78),
    "VQ-KD_CLIP": dict(codebook_usage=100.0, rfid=4.96, ppl=53.73, fid_ar=11.78, fid_nar=9.51),
    "VQ-KD_ViT": dict(codebook_usage=100.0, rfid=3.69, ppl=89.30, fid_ar=11.40, fid_nar=8.45),
    "VQ-KD_DINO": dict(codebook_usage=100.0, rfid=3.41, ppl=74.07, fid_ar=13.15, fid_nar=10.21),
    "VQ-KD_MAE": dict(codebook_usage=100.0, rfid=4.93, ppl=280.06, fid_ar=26.85, fid_nar=16.11),
}

TABLE_T2I = {
    "VQGAN": dict(codebook_usage=2.4, rfid=16.21, ppl=47.89, fid_ar=38.43, fid_t2i=24.11),
    "FSQ": dict(codebook_usage=100.0, rfid=4.62, ppl=1040.02, fid_ar=44.64, fid_t2i=23.36),
    "VQ-KD_CLIP": dict(codebook_usage=82.2, rfid=5.48, ppl=72.31, fid_ar=29.80, fid_t2i=11.17),
    "VQ-KD_ViT": dict(codebook_usage=100.0, rfid=3.70, ppl=117.10, fid_ar=23.51, fid_t2i=15.49),
    "VQ-KD_DINO": dict(codebook_usage=100.0, rfid=2.69, ppl=129.93, fid_ar=17.55, fid_t2i=11.50),
    "VQ-KD_MAE": dict(codebook_usage=100.0, rfid=3.51, ppl=317.98, fid_ar=44.01, fid_t2i=15.60),
}

SOURCE = ("paper: ImageNet-1k class-conditional table (usage, rFID, PPL, FID_AR, FID_NAR) and the "
          "second setting's table (FID_T2I), as in reference/paper.md")

# The paper's three main observations, worded as in reference/paper.md.
OBSERVATIONS = (
    "VQ-KD significantly enhances generation quality over VQGAN.",
    "The superiority is unrelated to the quantization operation or codebook usage (FSQ also uses "
    "100%).",
    "Tokenizers with stronger semantic understanding give better generation.",
)


def paper_row(label: str) -> dict:
  """The paper's numbers for a tokenizer label ("VQGAN", "VQ-KD_CLIP", ...) under this table's
  keys (codebook_usage, rfid, ppl, fid_ar, fid_nar from the ImageNet table; fid_t2i from the
  second); {} for a row the paper does not have (Cluster)."""
  if label not in TABLE_IMAGENET:
    return {}
  out = dict(TABLE_IMAGENET[label])
  out["fid_t2i"] = TABLE_T2I[label]["fid_t2i"]
  return out
