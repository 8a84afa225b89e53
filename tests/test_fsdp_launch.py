"""FSDP under `accelerate launch` on the CPU: Accelerate 1.15 has none there and would silently run DDP instead, so
`gptb train` refuses the launch before writing anything (issue 12 item 11; DDP stays the tested multi-process path)."""

import os
import subprocess
import sys
from pathlib import Path

import test_train_cli as train_cli

FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: GPTBBlock
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
rdzv_backend: static
same_network: true
"""


def test_an_fsdp_launch_on_the_cpu_is_refused_not_run_as_ddp(tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    output = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config)]
    command += ["--main_process_port", str(train_cli.free_port()), "-m", "modeling_gptb.train"]
    command += ["--output_dir", str(output), *train_cli.TINY_RUN, "--max_steps", "2"]
    result = subprocess.run(command, env=env, cwd=train_cli.REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0, "the FSDP launch ran (as DDP) instead of being refused"
    assert "gptb train: error: the launch asks for FSDP, but Accelerate runs MULTI_CPU here" in result.stderr
    assert not output.exists()  # refused before anything was written
