"""Settings, run names and layouts are refused before any work, with one line naming the setting."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from common.errors import ConfigError
from tests.conftest import ROOT, recipe_config


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=abc", "trainer.max_steps must be an integer >= 1, got 'abc'"),
    ("trainer.max_steps=0", "trainer.max_steps must be an integer >= 1, got 0"),
    ("data.max_duration_s=0", "data.max_duration_s must be a number in (0, inf), got 0"),
    ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got -1"),
    ("data.max_bad_item_fraction=1.5", "data.max_bad_item_fraction must be a number in [0, 1], got 1.5"),
    ("optim.lr=-1e-3", "optim.lr must be a number in (0, inf), got -0.001"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps must be an integer >= 1, got 0"),
    ("trainer.limit_val_batches=2.5", "trainer.limit_val_batches must be a number of batches >= 0 or a fraction"),
    ("trainer.precision=bf17", "trainer.precision must be one of"),
    ("checkpoint.async_save=sometimes", "checkpoint.async_save must be auto, true or false, got 'sometimes'"),
    ("run.resume=maybe", "run.resume must be true or false, got 'maybe'"),
    ("run.name=../../etc", "run.name '../../etc' is not a valid run name"),
    ("run.name=a/b", "run.name 'a/b' is not a valid run name"),
    ("run.name=latest", "run.name 'latest' is not a valid run name"),
    ("data.speed_perturb=[0.9,3]", "data.speed_perturb must be a list of speed factors in [0.5, 2]"),
    ("data.speed_perturb=0.9", "data.speed_perturb must be a list of speed factors in [0.5, 2] (e.g. [0.9, 1.0, 1.1]) "
                               "or null, got 0.9"),
    ("data.noise={snr_db:[30,10]}", "data.noise: snr_db must be [low, high] in dB with low <= high, got [30, 10]"),
    ("ema.decay=1.0", "ema.decay must be a number in (0, 1) or null, got 1.0"),
    ("run.stall_timeout_s=0", "run.stall_timeout_s must be a number in (0, inf) or null, got 0"),
    ("run.stall_timeout_s=600", "run.stall_timeout_s (600) must be below run.collective_timeout_s (600): the "
                                "collective timeout would end the run first, without naming the stuck rank"),
    ("salm_fsdp2:ema.decay=0.999", "ema.decay=0.999: weight averaging is for the DDP recipes (asr_ddp, tts_ddp); "
                                   "recipe salm_fsdp2 shards its model (FSDP2)"),
])
def test_bad_settings_are_named(override, message):
    from common.settings import check_settings

    recipe, _, override = override.rpartition(":") if override.startswith("salm") else ("asr_ddp", "", override)
    cfg = recipe_config(recipe, ["run.name=ok", override])
    with pytest.raises(ConfigError) as e:
        check_settings(cfg)
    assert message in str(e.value)


def test_ctc_compression_without_a_ctc_head_is_refused_with_the_fix():
    from common.settings import check_settings

    cfg = recipe_config("salm_fsdp2", ["run.name=ok", "model.ctc_aux_weight=0"])
    with pytest.raises(ConfigError, match=r"ctc_compress=true needs a CTC head, but model.ctc_aux_weight is 0"):
        check_settings(cfg)
    check_settings(recipe_config("salm_fsdp2", ["run.name=ok", "model.ctc_aux_weight=0",
                                                "model.projector.ctc_compress=false"]))


def test_every_recipe_default_passes_the_checks():
    from common.settings import check_settings

    for recipe in ("asr_ddp", "tts_ddp", "salm_fsdp2", "salm_tp_fsdp2"):
        check_settings(recipe_config(recipe, ["run.name=20261128-101010-ab12"]))


def test_default_run_names_never_collide(monkeypatch):
    from common.run import new_run_name, resolve_run_name

    monkeypatch.delenv("RUN_NAME", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    names = {new_run_name() for _ in range(50)}  # the same second, one process each
    assert len(names) == 50
    assert resolve_run_name() == resolve_run_name()  # one process: one name, however often resolved
    # Ranks of one torchrun launch agree on one name without talking (its run id).
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "4f1c2a9e-77aa-4bbb-8ccc-0123456789ab")
    assert new_run_name() == "torchrun-4f1c2a9e-77aa-4bbb-8ccc-"
    monkeypatch.setenv("RUN_NAME", "exp1")
    assert resolve_run_name() == "exp1"
    # make run: one name per invocation, fixed for the whole recipe (make quality reuses it).
    env = {k: v for k, v in os.environ.items() if k != "RUN_NAME"}
    show = ["make", "-s", "--no-print-directory", "--eval", "show-run-name: ; @echo $(RUN_NAME)", "show-run-name"]
    made = {subprocess.run(show, cwd=ROOT, env=env, capture_output=True, text=True).stdout.strip() for _ in range(5)}
    assert len(made) == 5 and all(len(n.split("-")) == 3 for n in made), made


@pytest.mark.parametrize("nproc", ["0", "two", "-1"])
def test_make_run_refuses_a_bad_nproc(nproc):
    proc = subprocess.run(["make", "-s", "run", "RECIPE=asr_ddp", f"NPROC={nproc}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert f"error: NPROC must be a positive integer (processes per node), got '{nproc}'" in proc.stderr


def test_tensor_parallel_hint_lists_only_sizes_it_accepts():
    from transformers import Qwen3Config

    from common.parallel import check_tensor_parallel

    cfg = Qwen3Config(num_attention_heads=8, num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=False)
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(4, cfg, 64)
    assert "num_key_value_heads (2)" in str(e.value) and str(e.value).endswith("[1, 2]")
    check_tensor_parallel(2, cfg, 64)  # what the hint offers is accepted
    with pytest.raises(ConfigError, match=r"vocabulary size \(30\).*: \[1, 2\]"):
        check_tensor_parallel(4, Qwen3Config(num_attention_heads=8, num_key_value_heads=4, intermediate_size=256,
                                             tie_word_embeddings=False), 30)


@pytest.mark.parametrize("gpus_per_node", [1, 3])
def test_k8s_render_refuses_tensor_parallel_groups_across_nodes(gpus_per_node):
    proc = subprocess.run(["make", "-s", "k8s-render", "RECIPE=salm_tp_fsdp2", "NODES=2",
                           f"GPUS_PER_NODE={gpus_per_node}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not proc.stdout
    assert (f"error: tensor_parallel_size (2) does not divide GPUS_PER_NODE / trainer.devices ({gpus_per_node}): "
            "a tensor-parallel group would span nodes") in proc.stderr
    # The same rule make plan applies: it lists tp=2 as rejected for this node size.
    from common.tools.plan import plan

    result = plan("salm_tp_fsdp2", gpus_per_node, 2)
    assert any(s["tp"] == 2 and "span nodes" in s["reason"] for s in result["skipped"])


def test_a_damaged_sharded_checkpoint_is_detected(tmp_path):
    """Auto-resume's check on a DCP directory: a truncated or missing shard, a missing meta.pt."""
    import torch.distributed.checkpoint as dcp

    from common.checkpoint import checkpoint_problem

    ckpt = tmp_path / "step000004.ckpt"
    dcp.save({"w": torch.randn(64, 64)}, checkpoint_id=str(ckpt), no_dist=True)
    torch.save({"global_step": 4}, ckpt / "meta.pt")
    assert checkpoint_problem(ckpt) is None
    shard = next(p for p in ckpt.iterdir() if p.suffix == ".distcp")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert "has" in checkpoint_problem(ckpt) and "its index needs" in checkpoint_problem(ckpt)
    shard.unlink()
    assert checkpoint_problem(ckpt) == f"shard {shard.name} is missing"
    (ckpt / "meta.pt").unlink()
    assert checkpoint_problem(ckpt) == "no meta.pt"
    single = tmp_path / "step000002.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256)}}, single)
    assert checkpoint_problem(single) is None
    single.write_bytes(single.read_bytes()[:100])
    assert checkpoint_problem(single) is not None


def test_export_refuses_a_directory_it_did_not_write(tmp_path):
    from common.tools.export import CONFIG_FILE, WEIGHTS_FILE, check_out_dir

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="is a run directory; export writes only a new directory"):
        check_out_dir(run_dir)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="a non-empty directory that is not an earlier export"):
        check_out_dir(other)
    earlier = tmp_path / "export"
    earlier.mkdir()
    (earlier / CONFIG_FILE).write_text("{}")
    (earlier / WEIGHTS_FILE).write_bytes(b"")
    check_out_dir(earlier)  # an earlier export is replaced
    check_out_dir(tmp_path / "new")
    assert (other / "todo.txt").read_text() == "mine" and (run_dir / "metrics.jsonl").exists()


def test_every_typed_setting_is_declared_once_in_the_yaml_and_refuses_a_wrong_type():
    """Defaults live in one place: each setting of the typed table is declared by base.yaml or the
    family file of every recipe (no code restates it); a value of the wrong type is named."""
    from omegaconf import OmegaConf

    from common.settings import SETTINGS, check_settings

    for recipe in ("asr_ddp", "tts_ddp", "salm_fsdp2", "salm_tp_fsdp2"):
        cfg = recipe_config(recipe, ["run.name=ok"])
        undeclared = [s.key for s in SETTINGS if OmegaConf.select(cfg, s.key, default="<undeclared>") == "<undeclared>"]
        assert not undeclared, f"{recipe}: {undeclared}"
    base = recipe_config("asr_ddp", ["run.name=ok"])
    for setting in SETTINGS:
        bad = base.copy()
        OmegaConf.update(bad, setting.key, "abc" if setting.kind != "choice" else "nope", force_add=True)
        with pytest.raises(ConfigError, match=rf"^{setting.key} must be .*, got '(abc|nope)'$"):
            check_settings(bad)
