"""asr_ddp: DDP loss parity with one process, the run contract, and transcription from its checkpoint."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet

from tests.conftest import ROOT, assert_ddp_parity, ddp_parity_metrics, run_recipe, tiny_overrides

STEPS = 6


@pytest.fixture(scope="module")
def parity_runs(tiny_corpus, tmp_path_factory):
    # SpecAugment draws random masks per worker: off, so both runs see identical features.
    return ddp_parity_metrics("asr_ddp", tiny_corpus, tmp_path_factory.mktemp("asr_ddp_parity"), STEPS, "data.spec_augment=null")


def test_ddp_two_processes_match_one_process(parity_runs):
    assert_ddp_parity(parity_runs, STEPS)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("asr_run") / "outputs" / "asr_ddp" / "contract"
    proc = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, "trainer.max_steps=4", "trainer.val_check_interval=4",
                                               "checkpoint.every_n_steps=2"), run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_run_contract_with_ddp_strategy(trained):
    s = json.loads((trained / "summary.json").read_text())
    assert (s["recipe"], s["status"], s["steps"], s["strategy"]) == ("asr_ddp", "completed", 4, "DDPStrategy")
    assert (s["world_size"], s["data_parallel_size"], s["tensor_parallel_size"]) == (2, 2, 1)
    # The untrained model inserts words (WER above 1); after 4 steps it emits no more words than the
    # references hold: a real WER, bounded by 1, from a model that learned something.
    assert s["val"]["wer"] <= 1.0 < s["val_first"]["wer"] and s["val"]["loss"] < s["val_first"]["loss"]
    config = (trained / "config.yaml").read_text()
    assert "DDPStrategy" in config and "gradient_as_bucket_view: true" in config
    assert "ModelParallelStrategy" not in config
    # One checkpoint file (DDP: rank 0 writes the whole model), carrying its config and tokenizer.
    ckpt = torch.load(s["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["run_config"]["recipe"] == "asr_ddp" and ckpt["tokenizer_json"]
    assert any(k.startswith("model.ctc.ctc_head") for k in ckpt["state_dict"])
    assert (trained / "tokenizer" / "bpe_tokenizer.json").exists()
    assert [json.loads(x)["step"] for x in (trained / "validation.jsonl").read_text().splitlines()] == [0, 4]


def _transcribe(*args):
    return subprocess.run([sys.executable, "-m", "common.tools.transcribe", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_transcribe_any_rate_and_channels(trained, tiny_corpus, tmp_path):
    from lhotse.augmentation import Resample

    from common.inference import load_model
    from common.tools.transcribe import read_features, transcribe

    audio = CutSet.from_file(tiny_corpus["val"])[0].load_audio()[0]  # 16 kHz mono
    orig, wav, flac = tmp_path / "orig.wav", tmp_path / "stereo.wav", tmp_path / "b.flac"
    sf.write(orig, audio, 16000)
    sf.write(wav, np.stack([audio, audio], axis=1), 16000)
    sf.write(flac, Resample(16000, 44100)(audio), 44100)
    ckpt = trained / "checkpoints" / "last.ckpt"
    proc = _transcribe(ckpt, wav, flac)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [x.split("\t")[0] for x in lines] == [str(wav), str(flac)]
    # Stereo is downmixed: the same transcript as the mono original (the model is barely trained,
    # so compare with its own decoding rather than the reference text).
    model, tok, cfg = load_model(ckpt)
    assert lines[0].split("\t")[1] == transcribe(model, tok, cfg, orig)
    # 44.1 kHz is resampled to the model's 16 kHz: the same frames, nearly the same features.
    ref, got = read_features(orig, 16000, cfg.data.num_mel_bins), read_features(flac, 16000, cfg.data.num_mel_bins)
    assert got.shape == ref.shape and (got - ref).abs().mean() < 0.05

    # The Makefile entry point users are told to use.
    make = subprocess.run(["make", "-s", "transcribe", "RECIPE=asr_ddp", f"CKPT={ckpt}", f"AUDIO={flac}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert make.returncode == 0 and make.stdout.strip().splitlines()[-1] == lines[1], make.stderr[-2000:]


def test_transcribe_reports_each_bad_file_and_goes_on(trained, tiny_corpus, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    good = tmp_path / "good.wav"
    sf.write(good, CutSet.from_file(tiny_corpus["val"])[0].load_audio()[0], 16000)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio")
    missing = tmp_path / "nope.wav"
    proc = _transcribe(ckpt, missing, good, junk)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [x.split("\t")[0] for x in proc.stdout.strip().splitlines()] == [str(good)]  # the good one, after a bad one
    assert f"audio file {missing}: no such file" in proc.stderr
    assert f"audio file {junk}: cannot be read as audio" in proc.stderr
    assert "2 of 3 file(s) could not be transcribed" in proc.stderr and "Traceback" not in proc.stderr
    no_ckpt = _transcribe(tmp_path / "none.ckpt", junk)
    assert no_ckpt.returncode == 2 and "none.ckpt: no such file or directory" in no_ckpt.stderr


def test_a_chunked_transcript_is_the_one_piece_transcripts_of_its_pieces(trained, tiny_corpus, tmp_path):
    """Two utterances with 0.5 s of silence between them, in one short file: in one piece, the CLI
    prints the model's transcript of the whole file; cut into chunks (--chunk-s below the file's
    length), it cuts inside the silence and prints the one-piece transcripts of the two sides,
    each written as its own file, joined by a space. The step-2 checkpoint still emits words for
    any sound, so neither side is empty."""
    from common.inference import load_model
    from common.tools.transcribe import audio_chunks, read_features

    model, tok, cfg = load_model(trained / "checkpoints" / "step000002.ckpt")

    def one_piece(path):
        feats = read_features(path, 16000, cfg.data.num_mel_bins)[None]
        return tok.decode(model.generate(feats, torch.ones(feats.shape[:2], dtype=torch.bool))[0]).strip()

    cuts = list(CutSet.from_file(tiny_corpus["val"]))
    first, second = cuts[2].load_audio()[0], cuts[6].load_audio()[0]
    audio = np.concatenate([first, np.zeros(8000, dtype=first.dtype), second])
    short = tmp_path / "two_utterances.wav"
    sf.write(short, audio, 16000, subtype="FLOAT")
    whole = _transcribe(trained / "checkpoints" / "step000002.ckpt", short)
    assert whole.returncode == 0 and whole.stdout.split("\t")[1].strip() == one_piece(short), whole.stderr[-3000:]

    chunk_s = (len(first) + 8000) / 16000  # the first chunk's search window [chunk_s - 1, chunk_s) holds the silence
    (a, b) = audio_chunks(short, 16000, chunk_s=chunk_s, search_s=1.0)
    assert len(first) <= len(a) <= len(first) + 8000  # the cut is in the silence
    sides = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for path, piece in zip(sides, (a, b)):
        sf.write(path, piece, 16000, subtype="FLOAT")
    expected = [one_piece(p) for p in sides]
    assert all(expected), expected
    chunked = _transcribe(trained / "checkpoints" / "step000002.ckpt", "--chunk-s", chunk_s, "--search-s", 1.0, short)
    assert chunked.returncode == 0, chunked.stderr[-3000:]
    assert chunked.stdout.split("\t")[1].strip() == " ".join(expected)


def test_transcribe_long_audio_in_bounded_memory(trained, tiny_corpus, tmp_path):
    """Ten minutes of speech-like audio: transcribed in 30 s chunks, peak memory of the process
    under 2 GB (whole-file attention over 15k positions needed several times that)."""
    from common.tools.transcribe import audio_chunks

    pieces, silences, total = [], [], 0  # silences: [start, end) sample spans
    cuts = list(CutSet.from_file(tiny_corpus["val"]))
    while total < 600 * 16000:
        audio = cuts[len(pieces) % len(cuts)].load_audio()[0]
        pieces += [audio, np.zeros(4800, dtype=audio.dtype)]
        silences.append((total + len(audio), total + len(audio) + 4800))
        total += len(audio) + 4800
    long_wav = tmp_path / "ten_minutes.wav"
    sf.write(long_wav, np.concatenate(pieces), 16000)
    chunks = list(audio_chunks(long_wav, 16000))
    assert sum(len(c) for c in chunks) == total and max(len(c) for c in chunks) <= 30 * 16000
    # Every chunk ends inside one of the 0.3 s silences between utterances (its quietest frames),
    # never in the noisy speech a plain 30 s cut would split.
    ends = np.cumsum([len(c) for c in chunks])[:-1]
    assert len(ends) >= 20 and all(any(a <= e <= b for a, b in silences) for e in ends), ends

    code = ("import resource, sys; from common.tools.transcribe import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(trained / "checkpoints" / "last.ckpt"), str(long_wav)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_kib = int(proc.stderr.split("MAXRSS_KIB")[1].split()[0])
    assert peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert proc.stdout.startswith(f"{long_wav}\t")
