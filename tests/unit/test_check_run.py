import json

from common.tools.check_run import main


def _summary(tmp_path, **overrides):
    s = {"recipe": "r", "status": "completed", "steps": 400, "wall_s": 420.0, "val": {"wer": 0.12},
         "val_first": {"wer": 0.97}, "throughput": {}}
    s.update(overrides)
    (tmp_path / "summary.json").write_text(json.dumps(s))
    return tmp_path


def test_passes_when_goals_hold(tmp_path):
    assert main([str(_summary(tmp_path)), "--max-wall-s", "600", "--max-wer", "0.2", "--min-wer-drop", "0.5"]) == 0


def test_fails_on_each_missed_goal(tmp_path, capsys):
    assert main([str(_summary(tmp_path, wall_s=700.0)), "--max-wall-s", "600"]) == 1
    assert "wall_s 700 > 600" in capsys.readouterr().err
    assert main([str(_summary(tmp_path, val={"wer": 0.35})), "--max-wer", "0.2"]) == 1
    assert main([str(_summary(tmp_path, val_first={"wer": 0.3})), "--min-wer-drop", "0.5"]) == 1
    assert main([str(_summary(tmp_path, status="failed")), "--max-wer", "0.2"]) == 1
    assert main([str(tmp_path / "missing")]) == 1


def test_mel_loss_drop_ratio(tmp_path):
    import json as _json

    from common.tools.check_run import check

    summary = {"status": "completed", "wall_s": 100, "val": {"mel_loss": 0.5}, "val_first": {"mel_loss": 2.0}}
    (tmp_path / "summary.json").write_text(_json.dumps(summary))
    assert check(tmp_path, 360, None, None, 0.6) == []  # 0.5 <= 0.4 * 2.0
    summary["val"]["mel_loss"] = 0.9
    (tmp_path / "summary.json").write_text(_json.dumps(summary))
    assert "val.mel_loss fell from 2.0 to 0.9: less than 60%" in check(tmp_path, 360, None, None, 0.6)[0]


def test_tts_intelligibility_goal_fails_above_the_cer_or_when_synthesis_did_not_end(tmp_path, capsys):
    ok = {"asr_cer": 0.04, "asr_num_sentences": 32, "synthesis_hit_frame_limit": 0, "synthesis_too_short": 0}
    assert main([str(_summary(tmp_path, val=ok)), "--max-asr-cer", "0.10"]) == 0
    assert main([str(_summary(tmp_path, val={**ok, "asr_cer": 0.92})), "--max-asr-cer", "0.10"]) == 1
    assert "val.asr_cer 0.920 > 0.1" in capsys.readouterr().err
    assert main([str(_summary(tmp_path, val={**ok, "synthesis_hit_frame_limit": 3})), "--max-asr-cer", "0.10"]) == 1
    assert "val.synthesis_hit_frame_limit: 3 of 32 sentences" in capsys.readouterr().err
    assert main([str(_summary(tmp_path, val={**ok, "synthesis_too_short": 1})), "--max-asr-cer", "0.10"]) == 1
    # No recognizer, no measurement: a failure that says what to do, never a pass.
    assert main([str(_summary(tmp_path, val={"mel_loss": 0.5})), "--max-asr-cer", "0.10"]) == 1
    assert "make quality RECIPE=asr_ddp" in capsys.readouterr().err


def test_test_set_goals_name_the_set_and_the_decoding(tmp_path, capsys):
    tests = {"unseen_sentences": {"wer": 0.4, "wer_lm": 0.12}, "unseen_voices": {"wer": 0.5}}
    run = _summary(tmp_path, test=tests)
    assert main([str(run), "--max-test-wer", "unseen_sentences.wer_lm=0.15", "--require-test", "unseen_voices"]) == 0
    assert main([str(run), "--max-test-wer", "unseen_sentences=0.15"]) == 1
    assert "test.unseen_sentences.wer 0.4 > 0.15" in capsys.readouterr().err
    assert main([str(run), "--require-test", "real_recordings"]) == 1
    assert "no test.real_recordings in summary.json (data.test sets: ['unseen_sentences', 'unseen_voices'])" in \
        capsys.readouterr().err
