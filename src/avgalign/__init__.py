"""avgalign: length-invariant direct alignment of language models.

Direct alignment losses (DPO, IPO, SLiC, SimPO, R-DPO) with the aggregation of sequence
log-likelihoods (sum, mean, |y|^alpha) as an independent switch, after Grinsztajn et al. (2024),
"Averaging log-likelihoods in direct alignment", arXiv:2406.19188.
"""

__version__ = "0.1.0"
