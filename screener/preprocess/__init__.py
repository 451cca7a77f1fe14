"""Preprocessing: one module per protocol, each with the single function that turns the
source images into the network input.  The daemon (inference) and the ``training`` dataset
builders call the same function, so training and inference see identical tensors.

:mod:`screener.preprocess.sampling` holds the plane sampler shared by the CT protocols.
"""
