"""Small helpers every layer of leanconv may use (they import only the standard library,
torch and :mod:`leanconv.errors`):

* :mod:`.files`: the one atomic writer, file sets written together, the JSON-lines store;
* :mod:`.progress`: the progress and stage callback types;
* :mod:`.modes`: ``eval_mode``; :mod:`.model_io`: input shapes, example inputs, one forward;
* :mod:`.timing`: timed calls and their statistics;
* :mod:`.batchnorm`: re-estimating BatchNorm statistics on a few batches (adaptive BN).
"""
