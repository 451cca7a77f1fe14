"""Dataset builders: recipe -> :class:`training.trainer.ArrayDataset`, one module per protocol.

Each ``training/datasets/<protocol>.py`` has ``build(recipe)`` and is registered in
:data:`training.plan.DATASET_FACTORIES`.  A builder reads the virtual cohort
(``[data] source = "cohort"``) or a site manifest (``source = "manifest"``) and calls the
protocol's preprocessing function from :mod:`screener.preprocess` -- the same function the
daemon calls at inference.
"""
