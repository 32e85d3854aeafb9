"""Channel importance: one protocol (``base``), one file per criterion.

``create_criterion(name, **kwargs)`` builds any registered criterion; ``criterion_names()``
lists them; ``run_criterion`` (:mod:`.settings`) builds one from a run's settings. HAP's
curvature side (Hessian traces, their cache, the ``hap`` criterion) is :mod:`.hessian`.
Importing this package registers the built-in criteria:

========  =======================================================  ==========
name      score of a group channel                                 needs data
========  =======================================================  ==========
hap       Hessian-aware sensitivity (Yu et al., WACV 2022)          yes
l1, l2    norm of the filters (Li et al., ICLR 2017)                no
bn        BatchNorm ``|gamma|`` (Liu et al., ICCV 2017)             no
taylor    first-order Taylor ``|w * dL/dw|`` (Molchanov, CVPR 2019)  yes
random    seeded uniform baseline                                   no
synflow   synaptic flow, data-free (Tanaka et al., NeurIPS 2020)   no
========  =======================================================  ==========
"""

from leanconv.importance.base import (Criterion, ScoringData, check_scores, create_criterion, criterion_names,
                                      register_criterion)
from leanconv.importance.batchnorm import BatchNormScale
from leanconv.importance.hessian.hap import HAP
from leanconv.importance.magnitude import Magnitude
from leanconv.importance.random import RandomScores
from leanconv.importance.settings import run_criterion
from leanconv.importance.synflow import SynFlow
from leanconv.importance.taylor import Taylor

__all__ = [
    # the protocol, and a run's settings as a criterion
    "ScoringData", "Criterion", "register_criterion", "create_criterion", "criterion_names", "check_scores",
    "run_criterion",
    # the built-in criteria
    "HAP", "Magnitude", "BatchNormScale", "Taylor", "RandomScores", "SynFlow",
]
