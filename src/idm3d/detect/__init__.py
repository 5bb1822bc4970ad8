"""Telling real from generated volumes through a trained run's denoiser run backwards (``idm3d detect``).

Above ``training`` (and ``demo``, for the study): the features themselves are in
:mod:`idm3d.diffusion.detection`; this package reads the volumes, fits and cross-validates the
detectors and writes their reports.
"""
