"""Log-mel features and SpecAugment, computed batched on the training device at the start of a step.

DataLoader workers only decode, resample, downmix and pad waveforms (``audio``, ``audio_lens``);
:class:`BatchFeatures` turns a whole padded batch into features in a few tensor ops on whatever
device the batch is on (the GPU in a GPU run, the CPU in a CPU run: the same code):

* log-mel: lhotse's Kaldi-compatible filterbank (``lhotse.Fbank``, 25 ms windows, 10 ms frames,
  ``snip_edges=False``), applied to frames cut from each utterance as lhotse cuts them from that
  utterance alone (its own reflected edges, not its neighbours' padding), so the features equal
  lhotse's per-utterance extraction (fp32, ~1e-6 relative);
* per-utterance normalisation over its own frames (recognizers) or raw log energies (TTS targets);
* additive noise (training only, :class:`NoiseConfig`): on the waveforms, at a random SNR per
  utterance, before the filterbank;
* SpecAugment (training only): lhotse's frequency and time masks, drawn for every utterance at
  once from a generator seeded by (seed, epoch, global batch index, dp rank), so a resumed run
  draws exactly the masks the first run drew (the noise is seeded the same way).

Usage::

    features = BatchFeatures(num_mel_bins=64, sample_rate=16000, spec_augment={"num_frame_masks": 2},
                             noise={"snr_db": [10, 30], "p": 0.5})
    batch = features(batch, training=True)   # audio -> input_features (B, T, bins), feature_mask (B, T)
"""

from __future__ import annotations

import hashlib
import math

import torch


class PaddedAudio:
    """A batch's waveforms (B, samples) fp32 and their lengths, moved to the device as they are.

    Not a bare tensor on purpose: Lightning's ``bf16-true`` converts every floating-point tensor of
    a batch to bf16 *before* it reaches the device; raw audio must keep fp32 for the filterbank. Its
    ``to()`` (and ``pin_memory()``) let Lightning and the DataLoader move it like a tensor.
    """

    def __init__(self, samples: torch.Tensor, lengths: torch.Tensor):
        self.samples, self.lengths = samples, lengths

    def to(self, *args, **kwargs) -> PaddedAudio:
        return PaddedAudio(self.samples.to(*args, **kwargs), self.lengths.to(*args, **kwargs))

    def pin_memory(self) -> PaddedAudio:
        return PaddedAudio(self.samples.pin_memory(), self.lengths.pin_memory())

    def __len__(self) -> int:
        return self.samples.shape[0]


FRAME_SHIFT_S = 0.01  # 10 ms feature frames


def frames_of_duration(duration_s: float, sample_rate: int) -> int:
    """Feature frames of an utterance of ``duration_s`` seconds, from metadata alone (lhotse's count)."""
    from lhotse.utils import compute_num_frames

    return compute_num_frames(duration_s, FRAME_SHIFT_S, sample_rate)


def frames_of_samples(num_samples, frame_shift_samples: int):
    """Frames lhotse's Fbank (``snip_edges=False``) makes of ``num_samples`` samples (ints or a tensor)."""
    return (num_samples + frame_shift_samples // 2) // frame_shift_samples


class BatchFeatures:
    """Padded waveforms -> log-mel features (+ SpecAugment), batched, on the batch's device.

    Not an ``nn.Module`` on purpose: its filterbank and window must stay fp32 when Lightning's
    ``bf16-true`` precision converts the model, and it has no state to checkpoint.
    """

    def __init__(self, num_mel_bins: int = 64, sample_rate: int = 16000, normalize: bool = True,
                 spec_augment: dict | None = None, seed: int = 0, noise: dict | None = None):
        from lhotse.features.kaldi.layers import Wav2LogFilterBank

        self.num_mel_bins, self.sample_rate, self.normalize, self.seed = num_mel_bins, sample_rate, normalize, seed
        self.spec_augment = SpecAugmentConfig(**spec_augment) if spec_augment else None
        self.noise = NoiseConfig(**noise) if noise else None
        # The same configuration as lhotse.Fbank(FbankConfig(num_mel_bins, sample_rate, frame_shift=0.01)).
        self._cpu = Wav2LogFilterBank(sampling_rate=sample_rate, frame_shift=FRAME_SHIFT_S,
                                      num_filters=num_mel_bins).eval()
        self._by_device: dict[torch.device, torch.nn.Module] = {}
        self.window = self._cpu.wav2win._length   # 400 samples at 16 kHz
        self.shift = self._cpu.wav2win._shift     # 160

    def num_frames(self, num_samples):
        return frames_of_samples(num_samples, self.shift)

    def _extractor(self, device: torch.device) -> torch.nn.Module:
        if device not in self._by_device:
            import copy

            self._by_device[device] = copy.deepcopy(self._cpu).to(device=device, dtype=torch.float32)
        return self._by_device[device]

    @torch.no_grad()
    def log_mel(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, T, bins) fp32, zero past each utterance's frames; num_frames (B,))``."""
        audio = audio.float()
        batch, device = audio.shape[0], audio.device
        num_frames = self.num_frames(audio_lens)
        # From the padded width, a host-side number: no device sync (padding frames are masked).
        max_frames = max(int(self.num_frames(audio.shape[1])), 1)
        # Each utterance framed as lhotse frames it alone: reflected by (window - shift) // 2 samples
        # at its start, and after its own last sample (not after the batch's padding) as far as its
        # last frame reads. One buffer for the batch, then a strided view of overlapping frames.
        left = (self.window - self.shift) // 2
        if audio.shape[1] < left:  # a batch of utterances shorter than 7.5 ms
            audio = torch.nn.functional.pad(audio, (0, left - audio.shape[1]))
        right = (max_frames - 1) * self.shift + self.window - left - audio.shape[1] + self.window
        lens = audio_lens.to(device)
        buf = torch.nn.functional.pad(audio, (left, max(right, 0)))
        buf[:, :left] = audio[:, :left].flip(1)
        k = torch.arange(self.window, device=device)[None, :]                 # right reflection, per utterance
        src = (lens[:, None] - 1 - k).clamp(min=0)
        buf.scatter_(1, left + lens[:, None] + k, audio.gather(1, src))
        frames = buf.as_strided((batch, max_frames, self.window), (buf.stride(0), self.shift, 1))
        extractor = self._extractor(device)
        strided, log_e = extractor.wav2win._forward_strided(frames)
        feats = extractor._forward_strided(strided, log_e)                    # (B, T, bins)
        mask = torch.arange(max_frames, device=device)[None, :] < num_frames.to(device)[:, None]
        if self.normalize:  # per utterance and bin over its own frames (population std, as numpy's)
            count = mask.sum(1, keepdim=True).clamp(min=1)[..., None]
            valid = mask[..., None]
            mean = (feats * valid).sum(1, keepdim=True) / count
            std = ((((feats - mean) ** 2) * valid).sum(1, keepdim=True) / count).sqrt()
            feats = (feats - mean) / (std + 1e-5)
        return feats * mask[..., None], num_frames.to(device)

    def of_waveform(self, samples, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (1, T, bins), mask (1, T))`` of one mono waveform (numpy or tensor), on ``device``."""
        wave = torch.as_tensor(samples, dtype=torch.float32).reshape(1, -1).to(device)
        feats, num_frames = self.log_mel(wave, torch.tensor([wave.shape[1]], device=wave.device))
        return feats, torch.arange(feats.shape[1], device=feats.device)[None, :] < num_frames[:, None]

    def __call__(self, batch: dict, training: bool = False) -> dict:
        """Replaces a batch's ``audio`` (:class:`PaddedAudio`) with ``input_features`` and ``feature_mask``."""
        if "audio" not in batch:
            return batch
        audio = batch.pop("audio")
        augment = training and not batch.get("substitute")
        key = (self.seed, *batch.get("augment_key", (0, 0, 0)))
        samples = audio.samples
        if augment and self.noise is not None:  # its own stream: turning noise on leaves SpecAugment's masks as they were
            samples = self.noise.apply(samples, audio.lengths, seeded_generator((*key, NOISE_STREAM), samples.device))
        feats, num_frames = self.log_mel(samples, audio.lengths)
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < num_frames[:, None]
        if augment and self.spec_augment is not None:
            feats = self.spec_augment.apply(feats, num_frames, mask, seeded_generator(key, feats.device))
        batch["input_features"], batch["feature_mask"] = feats, mask
        return batch


def seeded_generator(key: tuple, device: torch.device) -> torch.Generator:
    """A generator on ``device`` whose stream is a function of ``key`` only."""
    seed = int.from_bytes(hashlib.sha256(repr(tuple(int(k) for k in key)).encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


NOISE_STREAM = 1  # seeded_generator key suffix of the additive noise (SpecAugment uses the bare key)


class NoiseConfig:
    """Additive noise at a random signal-to-noise ratio, for a whole batch of waveforms at once.

    Per utterance, with probability ``p``: Gaussian noise, white (``color: white``) or with a 1/f
    spectrum (``pink``, closer to room and fan noise), at an SNR drawn uniformly from ``snr_db``
    ``[low, high]`` relative to that utterance's own power over its real samples (padding stays zero).

    Why not lhotse's: its ``CutMix`` mixes in recordings of a noise corpus (MUSAN), which no package
    ships here, and its ``RandomizedSmoothing`` adds noise of a fixed amplitude, not a ratio, drawn
    from the process's global RNG; this one is seeded per batch (``seeded_generator``), so a resumed
    run adds exactly the noise the uninterrupted run would have.
    """

    def __init__(self, snr_db=(10.0, 30.0), p: float = 0.5, color: str = "white"):
        if not (len(snr_db) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                         for v in snr_db) and snr_db[0] <= snr_db[1]):
            raise ValueError(f"snr_db must be [low, high] in dB with low <= high, got {list(snr_db)!r}")
        if not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        if color not in ("white", "pink"):
            raise ValueError(f"color must be white or pink, got {color!r}")
        self.snr_db, self.p, self.color = (float(snr_db[0]), float(snr_db[1])), float(p), color

    def apply(self, audio: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``audio`` (B, N) padded waveforms with their ``lengths`` -> the same plus noise (fp32)."""
        audio = audio.float()
        b, n = audio.shape
        dev = audio.device
        draws = torch.rand(b, 2, generator=gen, device=dev)
        snr = self.snr_db[0] + (self.snr_db[1] - self.snr_db[0]) * draws[:, 1]
        real = torch.arange(n, device=dev)[None, :] < lengths.to(dev)[:, None]
        power = (audio.square() * real).sum(1) / lengths.to(dev).clamp(min=1)
        if self.color == "pink":  # shape white noise's spectrum by 1/sqrt(f): power falls as 1/f
            # At a power-of-two length: an FFT of a length with a large prime factor (a padded batch's
            # width is any number) takes ~10x longer, 60 ms a batch on a CPU core.
            size = 1 << max(n - 1, 1).bit_length()
            spectrum = torch.fft.rfft(torch.randn(b, size, generator=gen, device=dev), dim=1)
            f = torch.arange(spectrum.shape[1], device=dev).clamp(min=1).float()
            noise = torch.fft.irfft(spectrum / f.sqrt(), n=size, dim=1)[:, :n]
        else:
            noise = torch.randn(b, n, generator=gen, device=dev)
        noise_power = (noise.square() * real).sum(1) / lengths.to(dev).clamp(min=1)
        scale = (power / (noise_power.clamp(min=1e-12) * 10 ** (snr / 10))).sqrt() * (draws[:, 0] < self.p)
        return audio + noise * scale[:, None] * real


class SpecAugmentConfig:
    """lhotse's ``SpecAugment`` masks (same settings, same meaning), for a whole batch at once.

    Per utterance, with probability ``p``: ``num_feature_masks`` frequency masks of width
    ``[0, features_mask_size)``, and up to ``num_frame_masks`` time masks of width
    ``[0, frames_mask_size)``, masking at most ``max_frames_mask_fraction`` of its frames; masked
    values are the utterance's mean. Time warping is not supported (``time_warp_factor`` must be null).
    """

    def __init__(self, num_feature_masks: int = 2, features_mask_size: int = 27, num_frame_masks: int = 10,
                 frames_mask_size: int = 100, max_frames_mask_fraction: float = 0.15, p: float = 0.9,
                 time_warp_factor: int | None = None):
        if time_warp_factor:
            raise ValueError(f"data.spec_augment.time_warp_factor={time_warp_factor}: time warping is not "
                             "supported by the batched SpecAugment (set it to null)")
        self.num_feature_masks, self.features_mask_size = int(num_feature_masks), int(features_mask_size)
        self.num_frame_masks, self.frames_mask_size = int(num_frame_masks), int(frames_mask_size)
        self.max_frames_mask_fraction, self.p = float(max_frames_mask_fraction), float(p)

    def apply(self, feats: torch.Tensor, num_frames: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
        b, t, f = feats.shape
        dev = feats.device
        nf, nt = self.num_feature_masks, self.num_frame_masks
        r = torch.rand(b, 1 + 2 * nf + 2 * nt, generator=gen, device=dev)  # every draw of the batch at once
        applied = r[:, 0] < self.p
        lens = num_frames.float()
        count = (mask.sum(1) * f).clamp(min=1)
        mean = (feats * mask[..., None]).sum((1, 2)) / count                  # (B,)
        # Frequency masks: width ~ U{0..size-1}, start ~ U[0, F - width).
        width = (r[:, 1 : 1 + nf] * self.features_mask_size).floor()
        start = (r[:, 1 + nf : 1 + 2 * nf] * (f - width)).floor()
        bins = torch.arange(f, device=dev)[None, None, :]
        freq = ((bins >= start[..., None]) & (bins < (start + width)[..., None])).any(1)  # (B, F)
        # Time masks: as many as the fraction allows, each at most its share of it.
        max_total = self.max_frames_mask_fraction * lens
        count_t = torch.minimum(torch.full_like(lens, nt), torch.ceil(max_total / self.frames_mask_size)).clamp(min=1)
        max_width = torch.minimum(torch.full_like(lens, self.frames_mask_size), torch.floor(max_total / count_t))
        width_t = (r[:, 1 + 2 * nf : 1 + 2 * nf + nt] * max_width[:, None]).floor()
        start_t = (r[:, 1 + 2 * nf + nt :] * (lens[:, None] - width_t)).floor()
        live = torch.arange(nt, device=dev)[None, :] < count_t[:, None]
        frames = torch.arange(t, device=dev)[None, None, :]
        time = ((frames >= start_t[..., None]) & (frames < (start_t + width_t)[..., None]) & live[..., None]).any(1)
        masked = (freq[:, None, :] | time[:, :, None]) & applied[:, None, None] & mask[..., None]
        return torch.where(masked, mean[:, None, None], feats)
