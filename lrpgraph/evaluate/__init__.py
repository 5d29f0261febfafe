"""lrpgraph.evaluate: score attribution methods (any method, not only LRP).

* :class:`GAE` — Global Attribution Evaluation (Vukadin et al. 2024): local consistency
  (faithfulness + robustness along gradient-guided MoRF/LeRF trajectories) times contrastiveness on
  2x2 mosaics.
* :class:`MoRF`, :class:`LeRF`, :class:`ABPC` — perturbation curves and the area between them;
  :class:`SRG` — the Symmetric Relevance Gain (the same area with patches, dataset-mean fill, 100 steps).
* :mod:`~lrpgraph.evaluate.methods` — attribution methods behind one signature
  ``(model, x, target) -> map like x``: every lrpgraph preset and gradient baselines.

Every metric takes its hyper-parameters in the constructor and is called as
``metric(model, x, y, attributions=None, explain=None)``; the result holds per-sample tensors and
``.aggregate()`` gives their means, ``.summary()`` means with bootstrap 95 % intervals
(:mod:`~lrpgraph.evaluate.stats`, also the mean over several seeds). The evaluator is separate from the engine: it imports lrpgraph
only to offer the presets as methods.
"""
from ._common import EvaluationError, ExplainFn, MetricResult
from .gae import GAE, GAEPlan, GAEResult, make_mosaic, score_map
from .methods import METHODS, get_method, method_names
from .stats import Interval, bootstrap_ci, mean_over_seeds, summarize
from .perturbation import ABPC, SRG, ABPCResult, CurveResult, LeRF, MoRF, SRGResult

__all__ = ["GAE", "GAEResult", "GAEPlan", "MoRF", "LeRF", "ABPC", "SRG", "CurveResult", "ABPCResult", "SRGResult",
           "METHODS", "get_method", "method_names", "EvaluationError", "ExplainFn", "MetricResult",
           "make_mosaic", "score_map", "Interval", "bootstrap_ci", "mean_over_seeds", "summarize"]
