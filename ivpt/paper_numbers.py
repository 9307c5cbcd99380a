"""Published CUB-200-2011 numbers that reports place our results next to (docs/method.md#evaluation-protocols).

IVPT's own table (arXiv 2503.06084) reports consistency, stability and accuracy only; NMI/ARI/KPR come from the
PDiscoFormer paper (ECCV 2024, K = 16 parts), the part-discovery protocol these metrics follow. Values marked
"unconfirmed" were taken from a secondary summary of the paper.
"""

PUBLISHED = {
    "IVPT (paper, unconfirmed)": {"consistency": 75.3, "stability": 75.9, "top1_micro": 90.8},
    "PDiscoFormer K=16 (ECCV 2024)": {"nmi": 73.38, "ari": 55.83, "kpr": 5.74, "top1_micro": 88.72},
}
