"""Validation: predictions checked against real runs here and against published figures.

:mod:`moesim.validation.ep` runs the real expert-parallel layer
(:mod:`moesim.measure.ep_layer`) on local ranks and simulates the same
configurations; :mod:`moesim.validation.published` simulates the cited figures of
``published.yaml``. ``moesim validate`` prints both.
"""
