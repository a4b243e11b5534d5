"""model.pretrained_encoder=<file>.nemo: a NeMo FastConformer checkpoint converted in memory.

The test writes a .nemo as NeMo does (a tar of model_config.yaml + model_weights.ckpt, NeMo module
names, decoder and preprocessor weights beside the encoder's) from a reference ParakeetEncoder, and
checks the loaded encoder computes exactly what the reference computes."""

import io
import re
import tarfile

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import ParakeetEncoder, ParakeetEncoderConfig

from common.models.encoder import build_encoder, nemo_encoder_config

NEMO_ENCODER = {  # NeMo's ConformerEncoder settings (model_config.yaml) for the reference below
    "_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 16, "feat_out": -1, "n_layers": 2,
    "d_model": 32, "subsampling": "dw_striding", "subsampling_factor": 8, "subsampling_conv_channels": 8,
    "causal_downsampling": False, "ff_expansion_factor": 2, "self_attention_model": "rel_pos", "n_heads": 2,
    "att_context_size": [-1, -1], "xscaling": True, "untie_biases": True, "pos_emb_max_len": 5000,
    "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "dropout": 0.1, "dropout_pre_encoder": 0.1,
    "dropout_emb": 0.0, "dropout_att": 0.1, "use_bias": True,
}


def _nemo_name(hf_name: str) -> str:
    """ParakeetEncoder parameter name -> NeMo's (written out here independently of the loader's table)."""
    name = hf_name.replace("subsampling.layers.", "pre_encode.conv.").replace("subsampling.linear.", "pre_encode.out.")
    name = name.replace(".conv.norm.", ".conv.batch_norm.").replace(".relative_k_proj.", ".linear_pos.")
    name = re.sub(r"\.([qkv])_proj\.", r".linear_\1.", name).replace(".o_proj.", ".linear_out.")
    name = re.sub(r"\.bias_([uv])$", r".pos_bias_\1", name)
    return "encoder." + name


@pytest.fixture
def reference_and_nemo(tmp_path):
    torch.manual_seed(0)
    ref = ParakeetEncoder(ParakeetEncoderConfig(**nemo_encoder_config_from_dict(NEMO_ENCODER))).eval()
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, torch.nn.BatchNorm1d):  # trained statistics, not the defaults
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
            if hasattr(module, "bias_u"):
                module.bias_u.normal_()
                module.bias_v.normal_()
    state = {_nemo_name(k): v for k, v in ref.state_dict().items() if not k.startswith("encode_positions.")}
    state["decoder.decoder_layers.0.weight"] = torch.randn(129, 32, 1)  # a CTC decoder: not the encoder's
    state["preprocessor.featurizer.fb"] = torch.randn(1, 16, 257)
    path = tmp_path / "fastconformer.nemo"
    with tarfile.open(path, "w") as tar:
        for name, payload in (("./model_config.yaml", yaml.safe_dump({"encoder": NEMO_ENCODER, "sample_rate": 16000})),
                              ("./model_weights.ckpt", None)):
            data = payload.encode() if payload is not None else _torch_bytes(state)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ref, path


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def nemo_encoder_config_from_dict(enc: dict) -> dict:
    return {"hidden_size": enc["d_model"], "num_hidden_layers": enc["n_layers"], "num_attention_heads": enc["n_heads"],
            "intermediate_size": enc["d_model"] * enc["ff_expansion_factor"], "num_mel_bins": enc["feat_in"],
            "conv_kernel_size": enc["conv_kernel_size"], "subsampling_factor": enc["subsampling_factor"],
            "subsampling_conv_channels": enc["subsampling_conv_channels"], "scale_input": enc["xscaling"],
            "max_position_embeddings": enc["pos_emb_max_len"], "layerdrop": 0.0}


def test_nemo_checkpoint_loads_and_computes_what_the_reference_computes(reference_and_nemo):
    ref, path = reference_and_nemo
    cfg = OmegaConf.create({"pretrained_encoder": str(path), "encoder_conv_norm": "auto"})
    encoder = build_encoder(cfg).eval()
    assert isinstance(encoder.layers[0].conv.norm, torch.nn.BatchNorm1d)  # auto keeps the trained BatchNorm
    feats, mask = torch.randn(2, 200, 16), torch.ones(2, 200, dtype=torch.long)
    mask[1, 150:] = 0
    with torch.no_grad():
        got = encoder(input_features=feats, attention_mask=mask).last_hidden_state
        want = ref(input_features=feats, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert nemo_encoder_config(path)["intermediate_size"] == 64  # d_model x ff_expansion_factor


def test_asr_and_salm_models_take_a_nemo_encoder(reference_and_nemo, salm_cfg):
    from common.data.tokenizer import SizedVocabulary
    from common.models.asr_ctc import CTCASR
    from common.models.salm import SALM

    ref, path = reference_and_nemo
    for build in (lambda c: CTCASR(c, SizedVocabulary(32)).ctc.encoder, lambda c: SALM(c, SizedVocabulary(32)).encoder):
        cfg = salm_cfg.model.copy()
        cfg.pretrained_encoder, cfg.encoder_conv_norm = str(path), "auto"
        encoder = build(cfg)
        assert torch.equal(encoder.layers[1].self_attn.relative_k_proj.weight, ref.layers[1].self_attn.relative_k_proj.weight)


def test_nemo_errors_name_the_file_and_the_setting(reference_and_nemo, tmp_path):
    _, path = reference_and_nemo
    with pytest.raises(ValueError, match="encoder_conv_norm=layer_norm would replace the BatchNorm"):
        build_encoder(OmegaConf.create({"pretrained_encoder": str(path), "encoder_conv_norm": "layer_norm"}))
    broken = tmp_path / "broken.nemo"
    with tarfile.open(broken, "w") as tar:
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match=r"broken.nemo: no model_config.yaml inside"):
        build_encoder(OmegaConf.create({"pretrained_encoder": str(broken), "encoder_conv_norm": "auto"}))
    with pytest.raises(FileNotFoundError, match=r"missing.nemo: no such .nemo file"):
        build_encoder(OmegaConf.create({"pretrained_encoder": str(tmp_path / "missing.nemo"), "encoder_conv_norm": "auto"}))
