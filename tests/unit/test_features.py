"""Features on the device: the batched log-mel equals lhotse's per-utterance Fbank; noise and SpecAugment are seeded."""

import numpy as np
import pytest
import torch
from lhotse import Fbank, FbankConfig

from common.data.features import BatchFeatures, NoiseConfig, PaddedAudio, SpecAugmentConfig

LENGTHS = [16000, 3333, 801, 48123, 160, 400, 161]


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    waves = [torch.randn(n, generator=gen) * 0.1 for n in LENGTHS]
    return waves, torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), torch.tensor(LENGTHS)


@pytest.mark.parametrize("normalize", [False, True])
def test_batched_log_mel_equals_lhotse_per_utterance(normalize):
    waves, audio, lens = _batch()
    feats, num_frames = BatchFeatures(64, 16000, normalize=normalize).log_mel(audio, lens)
    lhotse_fbank = Fbank(FbankConfig(num_mel_bins=64, sampling_rate=16000, frame_shift=0.01))
    for i, wave in enumerate(waves):
        ref = lhotse_fbank.extract(wave.numpy(), 16000)
        if normalize:  # the per-utterance standardization the CPU path applied
            ref = (ref - ref.mean(0, keepdims=True)) / (ref.std(0, keepdims=True) + 1e-5)
        ref = torch.from_numpy(ref)
        assert int(num_frames[i]) == ref.shape[0]
        got = feats[i, : ref.shape[0]]
        # 1e-4 relative (values near zero: absolute against the feature scale)
        assert ((got - ref).abs() <= 1e-4 * ref.abs().clamp(min=1.0)).all(), float((got - ref).abs().max())
        assert (feats[i, ref.shape[0]:] == 0).all()  # padding frames are zero, never a neighbour's audio


def test_an_utterance_does_not_depend_on_what_it_is_batched_with():
    waves, audio, lens = _batch()
    features = BatchFeatures(64, 16000)
    together, _ = features.log_mel(audio, lens)
    alone, _ = features.log_mel(waves[2][None], lens[2:3])
    assert torch.allclose(together[2, : alone.shape[1]], alone[0], atol=1e-5)


def _augmented(key, p=1.0):
    _, audio, lens = _batch()
    features = BatchFeatures(64, 16000, spec_augment={"num_feature_masks": 2, "features_mask_size": 8,
                                                      "num_frame_masks": 2, "frames_mask_size": 10, "p": p})
    batch = features({"audio": PaddedAudio(audio, lens), "augment_key": key}, training=True)
    return batch["input_features"], batch["feature_mask"]


def test_spec_augment_is_a_function_of_the_batch_key():
    a, mask = _augmented((0, 3, 1))
    b, _ = _augmented((0, 3, 1))
    c, _ = _augmented((0, 4, 1))
    plain = BatchFeatures(64, 16000)({"audio": PaddedAudio(_batch()[1], torch.tensor(LENGTHS))})["input_features"]
    assert torch.equal(a, b)  # a resumed run draws the same masks
    assert not torch.equal(a, c) and not torch.equal(a, plain)
    assert (a[~mask] == 0).all()  # padding stays zero
    # Masked values are the utterance's mean: whole constant bins in some long utterance.
    long = 3
    n = int(mask[long].sum())
    constant_bins = (a[long, :n].std(0) == 0).sum() + (a[long, :n].std(1) == 0).sum()
    assert constant_bins > 0


def test_spec_augment_off_for_validation_and_p_zero():
    _, audio, lens = _batch()
    features = BatchFeatures(64, 16000, spec_augment={"num_frame_masks": 2, "p": 1.0})
    val = features({"audio": PaddedAudio(audio, lens)}, training=False)["input_features"]
    plain = BatchFeatures(64, 16000)({"audio": PaddedAudio(audio, lens)})["input_features"]
    assert torch.equal(val, plain)
    off, _ = _augmented((0, 0, 0), p=0.0)
    assert torch.equal(off, plain)


def test_time_warp_is_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="data.spec_augment.time_warp_factor"):
        SpecAugmentConfig(time_warp_factor=80)


def test_of_waveform_matches_the_batch_path():
    waves, audio, lens = _batch()
    features = BatchFeatures(64, 16000)
    one, mask = features.of_waveform(np.asarray(waves[0]))
    batched, _ = features.log_mel(audio, lens)
    assert mask.all() and torch.allclose(one[0], batched[0, : one.shape[1]], atol=1e-5)


def test_raw_audio_survives_lightnings_bf16_true_input_cast():
    """bf16-true casts every float tensor of a batch before the transfer; the waveforms must stay fp32."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    _, audio, lens = _batch()
    batch = HalfPrecision("bf16-true").convert_input({"audio": PaddedAudio(audio, lens)})
    assert batch["audio"].samples.dtype == torch.float32 and torch.equal(batch["audio"].samples, audio)
    moved = batch["audio"].to("cpu")
    assert isinstance(moved, PaddedAudio) and torch.equal(moved.lengths, lens)


@pytest.mark.parametrize("color", ["white", "pink"])
def test_noise_reaches_the_drawn_snr_and_leaves_padding_zero(color):
    _, audio, lens = _batch()
    noise = NoiseConfig(snr_db=(12.0, 12.0), p=1.0, color=color)
    noisy = noise.apply(audio, lens, torch.Generator().manual_seed(0))
    for i, n in enumerate(LENGTHS):
        if n < 4000:  # a short utterance's measured SNR is too noisy a figure to check
            continue
        signal, added = audio[i, :n], noisy[i, :n] - audio[i, :n]
        snr = 10 * torch.log10(signal.square().mean() / added.square().mean())
        assert float(snr) == pytest.approx(12.0, abs=0.01)
        assert (noisy[i, n:] == 0).all()
    if color == "pink":  # 1/f: more of the noise's power below 1 kHz than white noise's 1/8
        added = (noisy[0] - audio[0]).numpy()
        power = np.abs(np.fft.rfft(added)) ** 2
        assert power[: len(power) // 8].sum() / power.sum() > 0.5


def test_noise_is_a_function_of_the_batch_key_and_off_outside_training():
    _, audio, lens = _batch()
    features = BatchFeatures(64, 16000, noise={"snr_db": [0, 10], "p": 1.0})
    plain = BatchFeatures(64, 16000)({"audio": PaddedAudio(audio, lens)})["input_features"]

    def feats(key, training=True):
        return features({"audio": PaddedAudio(audio, lens), "augment_key": key}, training=training)["input_features"]

    assert torch.equal(feats((0, 3, 1)), feats((0, 3, 1)))  # a resumed run adds the same noise
    assert not torch.equal(feats((0, 3, 1)), feats((0, 4, 1))) and not torch.equal(feats((0, 3, 1)), plain)
    assert torch.equal(feats((0, 3, 1), training=False), plain)  # validation and test sets are clean
    off = NoiseConfig(p=0.0).apply(audio, lens, torch.Generator().manual_seed(0))
    assert torch.equal(off, audio)


@pytest.mark.parametrize("bad, message", [({"snr_db": [30, 10]}, "low <= high"), ({"p": 2}, "probability"),
                                          ({"color": "brown"}, "white or pink"), ({"snr": [1, 2]}, "snr")])
def test_bad_noise_settings_are_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NoiseConfig(**bad)
