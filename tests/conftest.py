"""Shared test fixtures: tiny GPTB configs and models that run in milliseconds on a CPU."""

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from reference import ...` in the tests

from modeling_gptb import GPTBConfig, GPTBLMHeadModel  # noqa: E402

TINY = dict(
    vocab_size=61,
    n_embd=32,
    n_layer=2,
    n_head=4,
    state_size=3,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=60,
)


def tiny_config(**overrides) -> GPTBConfig:
    return GPTBConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPTBLMHeadModel:
    torch.manual_seed(seed)
    return GPTBLMHeadModel(tiny_config(**overrides)).eval()


@pytest.fixture
def model():
    return tiny_model()


def randomize(model, seed: int = 0, scale: float = 0.4):
    """Weights large enough that attention is sharp and greedy decoding does not sit on one token."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale
            param.copy_(1.0 + noise if "ln_" in name and name.endswith("weight") else noise)
    return model


def train_steps(model, x: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps of the LM loss on `x` over the trainable parameters; the loss before each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def tiny_tokenizer():
    """An offline `PreTrainedTokenizerFast` over the tiny vocabulary: id 0 `<|endoftext|>`, `w1`..`w58`, 59 `<unk>`,
    60 `<pad>` (the ids of `TINY`). Words are split on whitespace and decoded joined by spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 59)}, "<unk>": 59, "<pad>": 60}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: the tiny models gain nothing from more, and on a busy 2-core machine
    torch's spinning worker threads make step-by-step loops (generate) many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StopAfter(TrainerCallback):
    """Interrupt training after a given step, as a crash would: the schedule still plans for max_steps."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


# Opening of the fresh-process tests' scripts (argv[1] is the checkout): the checkout is not importable (a virtual
# environment inside it is kept, as in CI) and `import modeling_gptb` fails, so only remote code can define GPTB.
WITHOUT_THE_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, importlib.util, os, sys

    repo_root = os.path.realpath(sys.argv[1])

    def inside(entry, root):
        real = os.path.realpath(entry or os.getcwd())
        return real == root or real.startswith(root + os.sep)

    sys.path[:] = [p for p in sys.path if not inside(p, repo_root) or inside(p, os.path.realpath(sys.prefix))]

    class BlockGPTB(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_gptb" or name.startswith("modeling_gptb."):
                raise ImportError(f"{name} is blocked: this process must use the remote code")
            return None

    sys.meta_path.insert(0, BlockGPTB())
    try:
        import modeling_gptb  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("FAIL: modeling_gptb is importable in the remote-code subprocess")
    """
)
