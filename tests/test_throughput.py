"""Model FLOPs per token and MFU (modeling_gptb/throughput.py), and the `gpu` training recipe.

The reference for the FLOP count is torch's own `FlopCounterMode` over a real forward (and backward) of the model,
with SDPA on its math backend so the attention matmuls are counted too.
"""

import json

import pytest
import torch
from conftest import tiny_config
from test_train_cli import fresh_accelerate_state, train  # noqa: F401 (an autouse fixture)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modeling_gptb import GPTBConfig, GPTBLMHeadModel
from modeling_gptb.benchmarks.gpu_check import main as gpu_check_main
from modeling_gptb.presets import list_presets, load_recipe
from modeling_gptb.state_update import STATE_UPDATE_MODULES
from modeling_gptb.throughput import (
    forward_flops_per_token,
    model_flops_utilization,
    peak_flops,
    state_update_flops,
    train_flops_per_token,
)
from modeling_gptb.train import TrainArgs, args_from_namespace, build_parser


def counted_flops(model, ids, backward):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids)
        if backward:
            out.logits.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_inner": 48, "state_size": 6, "rebias": False}]
    + [{"state_update": variant, "state_size": 5} for variant in STATE_UPDATE_MODULES],
)
def test_flops_per_token_equal_torchs_count_of_a_real_step(overrides):
    config = tiny_config(**overrides)
    model = GPTBLMHeadModel(config).train()
    ids = torch.randint(0, config.vocab_size, (3, 5))
    tokens = ids.numel()
    assert counted_flops(model, ids, backward=False) == forward_flops_per_token(config) * tokens
    # the last step's state update reaches no logit, so its backward never runs: 2x its forward less per sequence
    unused = 2 * state_update_flops(config) * ids.shape[0]
    assert counted_flops(model, ids, backward=True) == train_flops_per_token(config) * tokens - unused


def test_mfu_of_gptb_small_against_a_given_peak():
    config = GPTBConfig()  # gptb-small's dimensions: D 768, 12 layers, M 32, V 50,257
    # 33 rows x 12 layers x 2 x (4 D^2 + 8 D^2) + 12 x 4 x 33^2 x D + 2 D V = 5,723,026,944 FLOPs forward
    assert forward_flops_per_token(config) == 5_723_026_944
    peak = peak_flops("cuda", peak_tflops=989.0)  # a given peak needs no GPU
    assert peak == 989e12
    mfu = model_flops_utilization(config, 25_000, peak)
    assert mfu == pytest.approx(25_000 * 3 * 5_723_026_944 / 989e12) and 0.43 < mfu < 0.44


def test_the_peak_comes_from_the_table_by_gpu_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops("cuda:0") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops("cuda:0") is None
    assert peak_flops("cpu") is None
    assert model_flops_utilization(GPTBConfig(), 1000.0, None) is None


@pytest.mark.parametrize("bad", [0.0, -5.0, float("nan")])
def test_a_bad_peak_is_refused(bad):
    with pytest.raises(ValueError, match=r"the peak must be > 0 TFLOP/s, got"):
        peak_flops("cpu", peak_tflops=bad)


def test_the_gpu_recipe_is_what_gptb_train_accepts():
    assert "gpu" in list_presets("recipes")
    recipe = load_recipe("gpu")
    unknown = set(recipe) - set(TrainArgs.__dataclass_fields__)
    assert not unknown, f"recipe keys that gptb train rejects: {sorted(unknown)}"
    args = args_from_namespace(build_parser().parse_args(["--preset", "gptb-small", "--recipe", "gpu"]))
    assert args.preset == "gptb-small" and args.mixed_precision == "bf16" and args.compile is True
    assert args.overrides == {"loss_chunk_size": 2048}
    assert GPTBConfig(**args.overrides).loss_chunk_size == 2048
    overridden = build_parser().parse_args(["--recipe", "gpu", "--set", "loss_chunk_size=512", "--peak_tflops", "700"])
    args = args_from_namespace(overridden)
    assert args.overrides == {"loss_chunk_size": 512} and args.peak_tflops == 700.0


def test_gptb_train_logs_mfu_against_the_given_peak(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "out"
    extra = ["--max_steps", "4", "--logging_steps", "2", "--report_to", "tensorboard", "--peak_tflops", "0.001"]
    assert train(output, *extra) == 0
    logged = {}
    for path in sorted(output.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in {"tokens_per_s", "mfu"} & set(accumulator.Tags()["scalars"]):
            logged.setdefault(tag, []).extend(event.value for event in accumulator.Scalars(tag))
    config = GPTBConfig.from_pretrained(output)
    assert len(logged["mfu"]) == len(logged["tokens_per_s"]) == 2
    for tokens_per_s, mfu in zip(logged["tokens_per_s"], logged["mfu"], strict=True):
        assert mfu == pytest.approx(tokens_per_s * train_flops_per_token(config) / 1e9, rel=1e-5)

    # gpu_check.sh reads the same figures back from the progress bar of the log
    log = tmp_path / "train.log"
    log.write_text(capsys.readouterr().err)
    assert gpu_check_main(["train-log", str(log), "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu_check_train.json").read_text())
    assert [window["tokens_per_s"] for window in summary["windows"]] == [round(v) for v in logged["tokens_per_s"]]
    assert [window["mfu"] for window in summary["windows"]] == pytest.approx(logged["mfu"], abs=5e-4)
    assert summary["steady_tokens_per_s"] == round(logged["tokens_per_s"][1])


def test_a_bad_peak_on_the_command_line_is_exit_2_before_any_work(tmp_path, capsys):
    assert train(tmp_path / "out", "--peak_tflops", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gptb train: error: --peak_tflops must be a finite number > 0, got -1.0"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_decode_check_refuses_a_machine_without_cuda(tmp_path, capsys):
    assert gpu_check_main(["decode", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "gpu_check: decode needs a CUDA device; torch sees none\n"
