"""Interventions: revert or transplant a parameter selection between a base B and a trained T, and evaluate.

* ``selection``: which tensors a selector (``ftrl.config.parse_selector``; the freeze policies' grammar)
  picks in a checkpoint, by name; trainable-parameter counts of a freeze policy.
* ``build``: the intervened checkpoint on disk, streamed byte range by byte range (sharded or not).
* ``stage``: the pipeline's ``intervene`` stage (``intervene/interventions.csv``, ``layer_scan.png``).

    python -m ftrl.run stages=[intervene]
    python -m pytest tests/test_intervene.py -q
"""
