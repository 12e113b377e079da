"""Does each of the paper's three observations hold in a demo's table? Fixed rules, stated in words.

The rules were written before any demo table was seen and are applied as they are; they never look
at the paper's numbers. Each `observation_k(rows)` takes the table's rows keyed by tokenizer label
("VQGAN", "FSQ", "VQ-KD_CLIP", ...; each a dict with fd_ar, fd_nar, fd_t2i, codebook_usage,
code_probe_accuracy) and returns {"observation", "verdict", "rule", "evidence"}, the verdict one of
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE. A generator (AR, NAR, T2I) enters a comparison only where both
rows have a finite FD_eval for it. Lower FD_eval is better.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np

from vqkd_jax.evaluation.paper import OBSERVATIONS

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
MARGIN = 0.10          # a FD_eval lower by at least 10% is "better", higher by as much "worse"
MIN_USAGE = 90.0       # observation 2 needs FSQ to use its codebook (the paper: 100%)
ALPHA = 0.05           # observation 3: one-sided permutation test of the rank correlation
GENERATORS = (("fd_ar", "AR"), ("fd_nar", "NAR"), ("fd_t2i", "T2I"))
MAIN_VQKD = "VQ-KD_CLIP"   # the paper's headline tokenizer


def _finite(x) -> bool:
  return isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def compare(a: float, b: float, margin: float = MARGIN) -> str:
  """'better' when a <= (1 - margin) b, 'worse' when b <= (1 - margin) a, else 'tie' (lower is
  better; a, b > 0)."""
  if a <= (1.0 - margin) * b:
    return "better"
  if b <= (1.0 - margin) * a:
    return "worse"
  return "tie"


def _pairwise(rows: Mapping[str, dict], a: str, b: str) -> dict:
  """{generator: (fd of a, fd of b, compare(a, b))} over the generators both rows have."""
  out = {}
  if a not in rows or b not in rows:
    return out
  for key, name in GENERATORS:
    x, y = rows[a].get(key), rows[b].get(key)
    if _finite(x) and _finite(y):
      out[name] = (float(x), float(y), compare(float(x), float(y)))
  return out


def _all_or_none(results: dict) -> str:
  better = [r[2] == "better" for r in results.values()]
  if not better:
    return INCONCLUSIVE
  if all(better):
    return HOLDS
  if not any(better):
    return DOES_NOT_HOLD
  return INCONCLUSIVE


def _fmt_pairs(results: dict, a: str, b: str) -> str:
  return "; ".join(f"{g}: {a} {x:.2f} vs {b} {y:.2f} ({c})" for g, (x, y, c) in results.items())


def observation_1(rows: Mapping[str, dict]) -> dict:
  rule = (f"{MAIN_VQKD} (the paper's headline VQ-KD) against VQGAN on FD_eval of every generator "
          f"both have (AR, NAR, T2I): 'better' = at least {MARGIN:.0%} lower. Holds if better "
          f"with every generator; does not hold if better with none; inconclusive otherwise.")
  res = _pairwise(rows, MAIN_VQKD, "VQGAN")
  evidence = _fmt_pairs(res, MAIN_VQKD, "VQGAN") or "no generator with both rows"
  others = []
  for label in sorted(rows):
    if label.startswith("VQ-KD") and label != MAIN_VQKD:
      r = _pairwise(rows, label, "VQGAN")
      if r:
        others.append(f"{label}: " + ", ".join(f"{g} {c}" for g, (_, _, c) in r.items()))
  if others:
    evidence += " | other VQ-KD rows against VQGAN (not part of the rule): " + "; ".join(others)
  return {"observation": OBSERVATIONS[0], "verdict": _all_or_none(res), "rule": rule,
          "evidence": evidence}


def observation_2(rows: Mapping[str, dict]) -> dict:
  rule = (f"FSQ is the control: a different quantizer that, like VQ-KD, uses its whole codebook. "
          f"If FSQ's codebook usage is below {MIN_USAGE:.0f}% the control fails: inconclusive. "
          f"Otherwise {MAIN_VQKD} against FSQ on FD_eval of every generator both have: holds if "
          f"{MAIN_VQKD} is better (at least {MARGIN:.0%} lower) with every generator, does not "
          f"hold if with none, inconclusive otherwise.")
  if "FSQ" not in rows or MAIN_VQKD not in rows:
    return {"observation": OBSERVATIONS[1], "verdict": INCONCLUSIVE, "rule": rule,
            "evidence": "FSQ or the VQ-KD_CLIP row is missing"}
  usage = {k: rows[k].get("codebook_usage") for k in ("VQGAN", "FSQ", MAIN_VQKD) if k in rows}
  usage_text = ", ".join(f"{k} {v:.1f}%" for k, v in usage.items() if _finite(v))
  res = _pairwise(rows, MAIN_VQKD, "FSQ")
  evidence = f"codebook usage: {usage_text}; " + (_fmt_pairs(res, MAIN_VQKD, "FSQ") or
                                                  "no generator with both rows")
  if not _finite(usage.get("FSQ")) or usage["FSQ"] < MIN_USAGE:
    return {"observation": OBSERVATIONS[1], "verdict": INCONCLUSIVE, "rule": rule,
            "evidence": evidence + " (FSQ below the usage bar)"}
  return {"observation": OBSERVATIONS[1], "verdict": _all_or_none(res), "rule": rule,
          "evidence": evidence}


def rank(x: Sequence[float]) -> np.ndarray:
  """Ranks 1..n, ties given their average rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):
    tie = x == v
    ranks[tie] = ranks[tie].mean()
  return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (Pearson correlation of the average ranks); nan if a side is
  constant."""
  rx, ry = rank(x), rank(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
  return float((rx * ry).sum() / den) if den > 0 else float("nan")


def spearman_p_negative(x: Sequence[float], y: Sequence[float], samples: int = 20000,
                        seed: int = 0) -> float:
  """One-sided p-value of a negative rank correlation: the share of orderings of y (all n! for
  n <= 8, else `samples` random ones) whose Spearman correlation with x is <= the observed one."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  observed = spearman(x, y)
  if not math.isfinite(observed):
    return 1.0
  if len(y) <= 8:
    perms = itertools.permutations(range(len(y)))
  else:
    rng = np.random.default_rng(seed)
    perms = (rng.permutation(len(y)) for _ in range(samples))
  count = total = 0
  for p in perms:
    total += 1
    count += spearman(x, y[list(p)]) <= observed + 1e-12
  return count / total


def observation_3(rows: Mapping[str, dict]) -> dict:
  rule = ("Semantic understanding of a tokenizer = its code probe accuracy (a linear classifier "
          "on each image's bag of codes, trained on training images, scored on validation). "
          "Spearman rank correlation between it and FD_eval over all tokenizer rows, per "
          "generator with at least 4 rows (AR, NAR): holds if negative with one-sided "
          f"permutation p < {ALPHA} for every such generator; does not hold if >= 0 for every "
          "one; inconclusive otherwise.")
  results, texts = [], []
  for key, name in GENERATORS:
    pairs = [(r["code_probe_accuracy"], r[key]) for r in rows.values()
             if _finite(r.get("code_probe_accuracy")) and _finite(r.get(key))]
    if len(pairs) < 4:
      continue
    sem, fd = zip(*pairs)
    rho = spearman(sem, fd)
    p = spearman_p_negative(sem, fd)
    results.append((rho, p))
    texts.append(f"{name}: rho {rho:+.2f}, p {p:.3f} over {len(pairs)} rows")
  if not results:
    verdict = INCONCLUSIVE
  elif all(math.isfinite(rho) and rho < 0 and p < ALPHA for rho, p in results):
    verdict = HOLDS
  elif all(math.isfinite(rho) and rho >= 0 for rho, _ in results):
    verdict = DOES_NOT_HOLD
  else:
    verdict = INCONCLUSIVE
  return {"observation": OBSERVATIONS[2], "verdict": verdict, "rule": rule,
          "evidence": "; ".join(texts) or "fewer than 4 rows with both numbers"}


def verdicts(rows: Sequence[dict]) -> list[dict]:
  """The three verdicts for one table (rows with a "tokenizer" label each)."""
  by_label = {r["tokenizer"]: r for r in rows}
  return [observation_1(by_label), observation_2(by_label), observation_3(by_label)]


def combine(per_seed: Sequence[Sequence[dict]]) -> list[dict]:
  """Overall verdicts over seeds: the verdict every seed gives, else inconclusive (the seeds'
  verdicts listed)."""
  out = []
  for k in range(len(per_seed[0])):
    seen = [v[k]["verdict"] for v in per_seed]
    overall = seen[0] if all(s == seen[0] for s in seen) else INCONCLUSIVE
    note = ("every seed agrees" if all(s == seen[0] for s in seen)
            else "seeds disagree: inconclusive")
    out.append({"observation": per_seed[0][k]["observation"], "verdict": overall,
                "rule": per_seed[0][k]["rule"] + " Over seeds: the verdict every seed gives, "
                "else inconclusive.",
                "per_seed": seen, "evidence": f"per seed: {', '.join(seen)} ({note})"})
  return out
