"""CKA math: Grams, unbiased HSIC, the streaming minibatch accumulator and its jackknife statistics.

Array math on numpy arrays or torch tensors (no files, no printing). References: Kornblith et al. 2019 (CKA), Nguyen, Raghu &
Kornblith 2020 (minibatch CKA), Song et al. 2012 (unbiased HSIC).
"""

from cka_offline.cka.accumulator import CKAStats, MinibatchCKA
from cka_offline.cka.hsic import center_columns, cka_linear_full, gram_linear, gram_rbf, hsic1_matrix, rbf_bandwidth
from cka_offline.cka.stats import student_t_ppf

__all__ = [
    "CKAStats",
    "MinibatchCKA",
    "center_columns",
    "cka_linear_full",
    "gram_linear",
    "gram_rbf",
    "hsic1_matrix",
    "rbf_bandwidth",
    "student_t_ppf",
]
