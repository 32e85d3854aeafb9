"""HAP: Hessian-aware pruning (Yu, Yao, Gholami et al., WACV 2022), the curvature side.

* :mod:`.traces`: per-channel Hessian traces by Hutchinson probes, with a standard-error
  stopping rule (``channel_traces``), or by the other estimators it dispatches to:
  :mod:`.hutchpp` (Hutch++) and :mod:`.gauss_newton` (the exact Gauss-Newton blocks);
* :mod:`.result`: what every estimator returns (``TraceResult``);
* :mod:`.hvp`: the batched Hessian-vector products behind them;
* :mod:`.cache`: a disk cache keyed by weights, data and probe settings;
* :mod:`.hap`: the ``hap`` criterion, ``Tr(H_pp) / numel(W_p) * ||W_p||^2`` per channel.

Neural Implant, HAP's other half, is a layer (:mod:`leanconv.layers.implant`) and a pruning
option (:mod:`leanconv.width.channels`, :mod:`leanconv.width.implant_fit`).
"""

from leanconv.importance.hessian.cache import cached_channel_traces
from leanconv.importance.hessian.traces import (ESTIMATORS, METHODS, TraceResult, channel_traces, default_params,
                                               layer_traces)

__all__ = ["channel_traces", "cached_channel_traces", "METHODS", "ESTIMATORS", "default_params", "TraceResult",
           "layer_traces"]
