"""Where `common.tools.transcribe.audio_chunks` cuts long audio: at the quietest 10 ms of each search window."""

import numpy as np
import pytest
import soundfile as sf

from common.errors import ConfigError
from common.tools.transcribe import audio_chunks

SR = 16000


def _noise_with_gaps(tmp_path, seconds: float, gaps: list[tuple[float, float, float]]):
    """White noise with (start_s, length_s, level) stretches scaled down to ``level`` (0 = silence)."""
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, int(seconds * SR)).astype(np.float32)
    for start_s, length_s, level in gaps:
        audio[int(start_s * SR): int((start_s + length_s) * SR)] *= level
    path = tmp_path / "noise.wav"
    sf.write(path, audio, SR, subtype="FLOAT")
    return path, audio


def _boundaries_s(chunks) -> list[float]:
    return list(np.cumsum([len(c) for c in chunks])[:-1] / SR)


def test_each_chunk_ends_in_the_quietest_frame_of_its_search_window(tmp_path):
    # 10 s chunks, 3 s search windows. Each window holds a 20 ms silence; the first window also
    # holds a longer stretch that is quieter than the noise but not silent, which must lose.
    # None of the silences is where a plain 10 s cut would fall.
    gaps = [(7.5, 0.3, 0.05), (8.2, 0.02, 0.0),  # window [7, 10): the silence at 8.2 s wins
            (16.0, 0.02, 0.0),                    # window [15.21.., 18.21..)
            (23.9, 0.02, 0.0)]                    # window [23.01.., 26.01..)
    path, audio = _noise_with_gaps(tmp_path, 30.0, gaps)
    chunks = list(audio_chunks(path, SR, chunk_s=10.0, search_s=3.0))
    assert np.array_equal(np.concatenate(chunks), audio)  # nothing lost or repeated
    cuts = _boundaries_s(chunks)
    assert len(cuts) == 3, cuts
    for cut, (start_s, length_s, _) in zip(cuts, gaps[1:]):
        assert start_s <= cut <= start_s + length_s, f"cut at {cut:.4f} s, silence at [{start_s}, {start_s + length_s}]"
    # Without a search window the cuts fall every 10 s, through the noise.
    assert _boundaries_s(audio_chunks(path, SR, chunk_s=10.0, search_s=0.0)) == [10.0, 20.0]


def test_audio_shorter_than_a_chunk_is_one_piece_and_a_bad_window_is_refused(tmp_path):
    path, audio = _noise_with_gaps(tmp_path, 2.5, [(1.0, 0.02, 0.0)])
    (piece,) = audio_chunks(path, SR, chunk_s=30.0, search_s=3.0)
    assert np.array_equal(piece, audio)
    with pytest.raises(ConfigError, match=r"--search-s \(5.0\) in \[0, chunk-s\)"):
        next(audio_chunks(path, SR, chunk_s=5.0, search_s=5.0))


def test_score_names_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from common.tools.score import main

    assert main([str(tmp_path / "nope.ckpt"), str(tmp_path / "dev.jsonl.gz")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'nope.ckpt'}: no such file or directory"
