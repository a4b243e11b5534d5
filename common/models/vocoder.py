"""Griffin-Lim vocoder for the raw log-mel frames of :class:`common.data.features.BatchFeatures` (``normalize=False``).

No training and no weights: the mel power is mapped back to linear frequencies with the
least-squares inverse of lhotse's own filterbank, and the phase is estimated by Griffin-Lim
iterations (torch STFT). Good enough to hear and to recognize what a TTS model says; a neural
vocoder gives natural quality.

Usage::

    vocoder = GriffinLim(num_mel_bins=64, sample_rate=16000)
    samples = vocoder(log_mel)            # (frames, bins) tensor -> 1-D float numpy array in [-1, 1]
"""

from __future__ import annotations

import numpy as np
import torch


class GriffinLim:
    def __init__(self, num_mel_bins: int = 64, sample_rate: int = 16000, num_iters: int = 32):
        from lhotse import Fbank, FbankConfig

        fbank = Fbank(FbankConfig(num_mel_bins=num_mel_bins, sampling_rate=sample_rate))
        extractor = fbank.extractor  # lhotse's Wav2LogFilterBank: the exact filterbank used in training
        self.mel_basis = extractor._fb.detach().T.float()  # (bins, fft_bins)
        self.inverse = torch.linalg.pinv(self.mel_basis)  # (fft_bins, bins)
        self.n_fft = extractor.fft_length
        self.hop = int(round(0.01 * sample_rate))
        self.win = int(round(0.025 * sample_rate))
        self.preemph = 0.97
        self.num_iters = num_iters

    def __call__(self, log_mel: torch.Tensor) -> np.ndarray:
        power = torch.exp(log_mel.float()) @ self.inverse.T  # (frames, fft_bins)
        magnitude = power.clamp(min=0).sqrt().T  # (fft_bins, frames)
        window = torch.hann_window(self.win)
        kwargs = dict(n_fft=self.n_fft, hop_length=self.hop, win_length=self.win, window=window, center=True)
        length = magnitude.shape[1] * self.hop  # as many samples as the frames cover
        gen = torch.Generator().manual_seed(0)  # deterministic phase initialisation
        angles = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=gen))
        for _ in range(self.num_iters):
            signal = torch.istft(magnitude * angles, length=length, **kwargs)
            rebuilt = torch.stft(signal, return_complex=True, **kwargs)
            angles = torch.exp(1j * torch.angle(rebuilt[:, : magnitude.shape[1]]))
        signal = torch.istft(magnitude * angles, length=length, **kwargs).numpy()
        from scipy.signal import lfilter

        signal = lfilter([1.0], [1.0, -self.preemph], signal)  # undo the front end's pre-emphasis
        peak = np.abs(signal).max()
        return (0.9 * signal / peak if peak > 0 else signal).astype(np.float32)
