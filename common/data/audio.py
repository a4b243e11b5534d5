"""Reading a cut's audio as the models take it: one channel at the model's sample rate.

Usage::

    samples = load_mono(cut, 16000)  # float32 numpy array, resampled and downmixed as needed
"""

from __future__ import annotations

import numpy as np


def load_mono(cut, sample_rate: int) -> np.ndarray:
    """Audio of a cut at ``sample_rate`` (resampled if needed), multi-channel downmixed to mono.
    A Shar item planned from its index is fetched here, by one ranged read (:mod:`common.data.shar`)."""
    from .shar import materialize

    cut = materialize(cut)
    if cut.sampling_rate != sample_rate:
        cut = cut.resample(sample_rate)
    audio = cut.load_audio()
    return audio.mean(axis=0) if audio.ndim == 2 else audio
